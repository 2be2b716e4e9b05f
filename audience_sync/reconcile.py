"""``reconcile``: read what Gist really holds, and make it the acknowledged ledger.

Most users come from Segment Engage's Gist destination, which has already set every audience
property in Gist: a first ``run`` would send every member again (and, with track events,
fire ``Audience Entered`` for everyone already in). A reconcile pages through every Gist
contact (``GET /contacts?page=N&per_page=P``, paced by the workspace's shared rate limit)
and records, for each chosen key, what Gist holds as if Gist had acknowledged it:

- an audience property ``true`` → a member, with the contact's email; ``false`` or absent →
  not a member;
- a computed trait's property → its value (canonical JSON); absent → no value;
- each contact's email → ``contacts`` (the email Gist holds for the user).

It sends no contact write and no event. The next ``run`` then diffs the source against what
Gist really holds: it sends only the differences, and events only for users who really enter
or leave. Contacts are matched by ``user_id``; leads (no ``user_id``) are skipped and counted.

Each page read is saved with the reading's progress in one transaction (``reconciles``,
``gist_holdings``), so a reconcile killed half-way is continued by the next one of the same
keys, not restarted: a finished page is read again only if the kill fell between its answer
and its save. The keys' leases are held throughout, as by ``run``, so a run and a reconcile
of one key never overlap; the reading is applied in one transaction fenced on them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import httpx
from sqlalchemy import (
    ColumnElement,
    Engine,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    union,
    update,
)
from sqlalchemy.engine import Connection

from audience_sync import lease
from audience_sync.budget import workspace_budget
from audience_sync.config import Computation, Settings
from audience_sync.db import upsert
from audience_sync.errors import (
    ApiError,
    AudienceSyncError,
    AuthError,
    LockHeldError,
    StopRequestedError,
)
from audience_sync.gist import GistClient, make_http_client
from audience_sync.ledger import owed_event
from audience_sync.models import (
    NULL_JSON,
    contacts,
    email_drift,
    gist_holdings,
    memberships,
    reconciles,
    rejected_rows,
    trait_values,
    uncertain_members,
)
from audience_sync.models import member_changes as changes
from audience_sync.pacer import Pacer
from audience_sync.plan import drop_readings
from audience_sync.rows import canonical_user_id, encode_value
from audience_sync.runs import Clock, RunResult, open_run, save_key_kind, save_run, utcnow
from audience_sync.sources import source_for
from audience_sync.stage import Staging
from audience_sync.statuses import RunKind, RunStatus
from audience_sync.sync import audience_keys
from audience_sync.workers import Presence

__all__ = ["DEFAULT_PER_PAGE", "ReconcileReport", "reconcile"]

log = logging.getLogger(__name__)

DEFAULT_PER_PAGE = 100  # contacts asked for per page (Gist may give fewer)


@dataclass(frozen=True)
class ReconcileReport:
    """What a reconcile read and found: one result per key (``members`` found in Gist;
    ``entered``/``exited``/``resent``: how the source differs from it), and the totals."""

    results: list[RunResult]
    contacts: int = 0
    pages: int = 0
    leads: int = 0
    dry_run: bool = False
    error: str | None = None


def reconcile(
    settings: Settings,
    engine: Engine,
    keys: str | Sequence[str] = (),
    *,
    dry_run: bool = False,
    per_page: int = DEFAULT_PER_PAGE,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
    worker: Presence | None = None,
) -> ReconcileReport:
    """Read every Gist contact and record what Gist holds for ``keys`` (every configured
    one when empty) as the ledger; with ``dry_run`` only count how the sources differ from
    it. Skips (``skipped``) a key whose lease another process holds."""
    chosen = [settings.audience(k) for k in audience_keys(keys)] or settings.computations
    stop = stop or threading.Event()
    registered = nullcontext(worker) if worker is not None else Presence(engine, "reconcile")
    with registered as worker:
        holder = lease.holder_for(engine, worker.id, settings)
        results: dict[str, RunResult] = {}
        held: list[Computation] = []
        kind: RunKind = "dry-reconcile" if dry_run else "reconcile"
        try:
            for audience in chosen:
                key = audience.property_key
                try:
                    holder.acquire(key)
                except LockHeldError as exc:
                    results[key] = RunResult(key, audience.name, kind, "skipped", error=str(exc))
                    continue
                held.append(audience)
            worker.running(a.property_key for a in held)
            holder.start()
            report = _reconcile(settings, engine, held, dry_run, per_page, transport, clock,
                                stop, holder, results)  # fmt: skip
        except BaseException as exc:
            for result in results.values():
                if result.status == "running":
                    status: RunStatus = (
                        "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                    )
                    save_run(engine, replace(result, status=status, error=repr(exc)), clock())
            raise
        finally:
            holder.stop()
            holder.release()
            worker.running(())
    return replace(report, results=[results[a.property_key] for a in chosen])


def _reconcile(
    settings: Settings,
    engine: Engine,
    held: list[Computation],
    dry_run: bool,
    per_page: int,
    transport: httpx.AsyncBaseTransport | None,
    clock: Clock,
    stop: threading.Event,
    holder: lease.Holder,
    results: dict[str, RunResult],
) -> ReconcileReport:
    kind: RunKind = "dry-reconcile" if dry_run else "reconcile"
    for audience in held:
        key = audience.property_key
        description = f"Gist contacts ({settings.gist.base_url.rstrip('/')})"
        run_id = open_run(engine, key, audience.name, description, kind, clock())
        results[key] = RunResult(key, audience.name, kind, "running", run_id=run_id)
    if not held:
        return ReconcileReport([], dry_run=dry_run)
    keys = sorted(a.property_key for a in held)
    traits = {a.property_key for a in held if a.is_trait}
    reading = _resume_or_start(engine, keys, per_page, clock)
    error: str | None = None
    try:
        asyncio.run(_read(settings, engine, reading, keys, traits, per_page, transport,
                          stop, holder))  # fmt: skip
    except StopRequestedError as exc:
        error = str(exc)
    except AuthError as exc:
        error = f"Gist refused the API key ({exc}); nothing was recorded"
    except ApiError as exc:
        error = f"{exc}; the pages read so far are kept, and the next reconcile continues"
    progress = _progress(engine, reading)
    if error is None:
        error = _finish(settings, engine, held, reading, dry_run, clock, holder, results)
    status: RunStatus = "interrupted" if stop.is_set() or holder.loss() else "failed"
    for key, result in list(results.items()):
        if result.status != "running":
            continue
        # Its own error: its source could not be read (Gist's reading is recorded all the
        # same, but how the source differs from it is unknown).
        unread = error is None and result.error is not None
        finished = replace(
            result,
            status="failed" if unread else "succeeded" if error is None else status,
            error=f"{result.error}; what Gist holds was recorded" if unread else error,
            failure="source" if unread else result.failure,
            contacts_read=progress.contacts,
            pages_read=progress.pages,
            leads=progress.leads,
        )
        results[key] = finished
        save_run(engine, finished, clock())
    if error is None:
        with engine.begin() as connection:
            connection.execute(delete(reconciles).where(reconciles.c.id == reading))
    return ReconcileReport(
        [], progress.contacts, progress.pages, progress.leads, dry_run=dry_run, error=error
    )


@dataclass(frozen=True)
class _Progress:
    next_page: int
    pages: int
    contacts: int
    leads: int


def _progress(engine: Engine, reading: int) -> _Progress:
    with engine.connect() as connection:
        row = connection.execute(
            select(reconciles.c.next_page, reconciles.c.pages, reconciles.c.contacts,
                   reconciles.c.leads).where(reconciles.c.id == reading)
        ).one()  # fmt: skip
    return _Progress(*row)


def _resume_or_start(engine: Engine, keys: list[str], per_page: int, clock: Clock) -> int:
    """The unfinished reading of exactly these keys at this page size, else a new one.
    Unfinished readings of any of these keys are gone with it (their leases are ours)."""
    joined = ",".join(keys)
    with engine.begin() as connection:
        unfinished = connection.execute(
            select(reconciles.c.id, reconciles.c.audience_keys, reconciles.c.per_page).where(
                reconciles.c.finished_at.is_(None)
            )
        ).all()
        for reading, their_keys, their_per_page in unfinished:
            if their_keys == joined and their_per_page == per_page:
                log.warning("continuing the reconcile of %s begun before", joined)
                return int(reading)
        drop_readings(connection, keys)
        return int(
            connection.execute(
                insert(reconciles)
                .values(audience_keys=joined, per_page=per_page, next_page=1, pages=0, contacts=0,
                        leads=0, started_at=clock())
                .returning(reconciles.c.id)
            ).scalar_one()
        )  # fmt: skip


async def _read(
    settings: Settings,
    engine: Engine,
    reading: int,
    keys: list[str],
    traits: set[str],
    per_page: int,
    transport: httpx.AsyncBaseTransport | None,
    stop: threading.Event,
    holder: lease.Holder,
) -> None:
    """Read the pages from where the reading stands, saving each with its progress."""
    gist = settings.gist
    page = _progress(engine, reading).next_page
    odd = Odd()
    async with make_http_client(gist, transport) as http:
        client = GistClient(http, deadline=gist.timeout_seconds)
        pacer = Pacer(gist, budget=workspace_budget(engine, gist))
        try:
            while True:
                if stop.is_set():
                    raise StopRequestedError("stopped by a signal while reading Gist's contacts")
                answer = await pacer.call(partial(client.fetch_contacts, page, per_page))
                if not answer.contacts:
                    return
                holdings, leads = _holdings(answer.contacts, keys, traits, odd)
                await asyncio.to_thread(
                    _save_page, engine, reading, page, holdings, len(answer.contacts), leads,
                    keys, holder,
                )  # fmt: skip
                if answer.more is False:
                    return
                page += 1
        finally:
            await pacer.close()
            odd.say()


class Odd:
    """Audience properties read that are neither ``true``, ``false`` nor null (``"true"``,
    ``1``): read as not members, as Gist's workflows comparing with ``true`` would, but said,
    once per key and reading. A Gist (or a tool before this one) that held members as
    ``"true"`` would otherwise have the next run enter all of them again, ``Audience Entered``
    and all, with no word of why."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.first: dict[str, tuple[str, Any]] = {}

    def add(self, key: str, user_id: str, value: Any) -> None:
        self.count[key] += 1
        self.first.setdefault(key, (user_id, value))

    def say(self) -> None:
        for key, (user_id, value) in self.first.items():
            n = self.count[key]
            log.warning(
                "%s: %d contact%s hold%s a value that is neither true nor false (first: user "
                "%s: %s), read as not members: the next run sends them true if the source "
                "has them", key, n, "" if n == 1 else "s", "s" if n == 1 else "",
                user_id, json.dumps(value),
            )  # fmt: skip


def _holdings(
    page: list[dict[str, Any]], keys: list[str], traits: set[str], odd: Odd | None = None
) -> tuple[dict[tuple[str, str], dict[str, Any]], int]:
    """What one page's contacts hold for ``keys``: members of audiences and trait values;
    and how many contacts were leads (no usable user id)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    leads = 0
    for contact in page:
        try:
            user_id = canonical_user_id(contact.get("user_id"))
        except ValueError:
            leads += 1
            continue
        email = contact.get("email") if isinstance(contact.get("email"), str) else None
        properties = contact.get("custom_properties")
        properties = properties if isinstance(properties, dict) else {}
        for key in keys:
            if key not in properties:
                continue
            value = properties[key]
            if key in traits:
                try:
                    encoded: str | None = encode_value(value)
                except ValueError:
                    continue  # nothing a source could hold: the next run sends the source's
            elif value is True:
                encoded = None
            else:
                if value is not False and value is not None and odd is not None:
                    odd.add(key, user_id, value)
                continue
            found[(key, user_id)] = {"key": key, "user_id": user_id, "email": email,
                                     "value": encoded}  # fmt: skip
    return found, leads


def _save_page(
    engine: Engine,
    reading: int,
    page: int,
    holdings: dict[tuple[str, str], dict[str, Any]],
    count: int,
    leads: int,
    keys: list[str],
    holder: lease.Holder,
) -> None:
    """Record one page and move the reading past it, in one transaction fenced on the
    keys' leases (a reconcile that lost one stops here)."""
    with holder.fenced(keys) as (connection, held):
        if held != set(keys):
            raise StopRequestedError("; ".join(holder.loss().values()) or "a lease was lost")
        rows = [{"reconcile_id": reading, **row} for row in holdings.values()]
        if rows:
            statement = upsert(engine, gist_holdings)
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=[gist_holdings.c.reconcile_id, gist_holdings.c.key,
                                    gist_holdings.c.user_id],
                    set_={"email": statement.excluded.email, "value": statement.excluded.value},
                ),
                rows,
            )  # fmt: skip
        connection.execute(
            update(reconciles)
            .where(reconciles.c.id == reading, reconciles.c.next_page == page)
            .values(
                next_page=page + 1,
                pages=reconciles.c.pages + 1,
                contacts=reconciles.c.contacts + count,
                leads=reconciles.c.leads + leads,
            )
        )


def _finish(
    settings: Settings,
    engine: Engine,
    held: list[Computation],
    reading: int,
    dry_run: bool,
    clock: Clock,
    holder: lease.Holder,
    results: dict[str, RunResult],
) -> str | None:
    """Count how each source differs from what Gist holds, then (unless ``dry_run``) make
    the reading the ledger. Returns an error that stopped it, if any."""
    settings_by_key = {a.property_key: a for a in held}
    with engine.connect() as connection:
        staging = Staging(connection)
        try:
            for key, audience in settings_by_key.items():
                results[key] = _compare(
                    settings, connection, staging, reading, audience, results[key]
                )
        finally:
            staging.drop()
    if dry_run:
        return None
    keys = sorted(settings_by_key)
    now = clock()
    with holder.fenced(keys) as (connection, held_keys):
        if held_keys != set(keys):
            return "; ".join(holder.loss().values()) or "a lease was lost"
        for key, audience in settings_by_key.items():
            _settle_applied(connection, reading, audience, now)
            _record(connection, engine, reading, key, audience.is_trait, results[key], now)
        _recompute_drift(connection)
        connection.execute(
            update(reconciles).where(reconciles.c.id == reading).values(finished_at=now)
        )
    for key, audience in settings_by_key.items():
        save_key_kind(engine, key, "trait" if audience.is_trait else "audience")
    return None


def _compare(
    settings: Settings,
    connection: Connection,
    staging: Staging,
    reading: int,
    audience: Computation,
    result: RunResult,
) -> RunResult:
    """``result`` with what Gist holds (``members``) and how the source differs from it:
    ``entered`` (in the source, not so in Gist), ``exited`` (held by Gist, gone from the
    source; a rejected row is no departure), ``resent`` (the same, with another email)."""
    key = audience.property_key
    assert result.run_id is not None
    h = gist_holdings
    mine = and_(h.c.reconcile_id == reading, h.c.key == key)
    with connection.begin():
        found = int(connection.scalar(select(func.count()).where(mine)) or 0)
    try:
        snapshot = staging.stage(
            result.run_id,
            source_for(settings, audience),
            value_type=getattr(audience, "type", None),
        )
    except AudienceSyncError as exc:
        return replace(result, members=found, error=f"the source could not be read: {exc}")
    s = snapshot.table
    held_row = and_(mine, h.c.user_id == s.c.user_id)
    if audience.is_trait:
        same = and_(held_row, h.c.value == s.c.value)
        gone = and_(mine, h.c.value != NULL_JSON)
    else:
        same, gone = held_row, mine
    glitch = exists().where(
        rejected_rows.c.run_id == result.run_id, rejected_rows.c.user_id == h.c.user_id
    )
    with connection.begin():
        entered = connection.scalar(
            select(func.count()).select_from(s).where(~exists().where(same))
        )
        exited = connection.scalar(
            select(func.count()).where(gone, ~exists().where(s.c.user_id == h.c.user_id), ~glitch)
        )
        resent = connection.scalar(
            select(func.count())
            .select_from(s)
            .where(exists().where(same, h.c.email.is_distinct_from(s.c.email)))
        )
    return replace(
        result,
        members=found,
        source_rows=snapshot.source_rows,
        rejected=snapshot.rejected,
        entered=int(entered or 0),
        exited=int(exited or 0),
        resent=int(resent or 0),
    )


def _settle_applied(connection: Connection, reading: int, audience: Computation, now: Any) -> None:
    """Of an uncertain user's changes since it became uncertain, the latest whose value the
    reading finds in Gist was applied, its answer lost (a timeout, a dropped connection, a
    kill): it becomes ``delivered``, and owes the event a run would have owed it
    (``send_track`` on, and the change moved the acknowledged value). Without this the
    reading would make it the ledger with no event ever sent: the next run re-sends an
    uncertain entry *with* its ``Audience Entered``, and after a reconcile no run sends one
    at all. Not only the latest change: an entry applied unanswered and an exit refused
    after it leave Gist holding the entry, and the exit the next run sends would announce
    leaving an audience never announced entered. Runs before ``_record`` replaces the
    ledger, whose old values say which changes moved it."""
    key = audience.property_key
    c = changes.alias("c")
    applied_here = _applied(c, reading, audience)
    latest = (
        select(func.max(c.c.id))
        .join(
            uncertain_members,
            and_(
                uncertain_members.c.audience_key == key,
                uncertain_members.c.user_id == c.c.user_id,
            ),
        )
        .where(
            c.c.audience_key == key,
            c.c.run_id >= uncertain_members.c.run_id,
            # superseded: a pending change of a run killed after sending it, re-planned since
            c.c.status.in_(["failed", "pending", "superseded"]),
            applied_here,
        )
        .group_by(c.c.user_id)
    )
    if audience.is_trait:
        old_value = (
            select(trait_values.c.value)
            .where(trait_values.c.trait_key == key, trait_values.c.user_id == changes.c.user_id)
            .scalar_subquery()
        )
        moved = func.coalesce(old_value, NULL_JSON) != func.coalesce(
            changes.c.value_json, NULL_JSON
        )
    else:
        member = exists().where(
            memberships.c.audience_key == key, memberships.c.user_id == changes.c.user_id
        )
        entry, exit_ = changes.c.value.is_(True), changes.c.value.is_(False)
        moved = or_(and_(entry, ~member), and_(exit_, member))
    connection.execute(
        update(changes)
        .where(changes.c.id.in_(latest))
        .values(
            status="delivered",
            delivered_at=now,
            event_status=case((and_(moved, literal(audience.send_track)), "pending"), else_=None),
            event_error=None,
        )
    )


def _applied(c: Any, reading: int, audience: Computation) -> ColumnElement[bool]:
    """The reading finds in Gist the value change ``c`` sent."""
    h = gist_holdings
    held = (
        h.c.reconcile_id == reading,
        h.c.key == audience.property_key,
        h.c.user_id == c.c.user_id,
    )
    if audience.is_trait:
        gist_value = select(h.c.value).where(*held).scalar_subquery()
        return func.coalesce(gist_value, NULL_JSON) == func.coalesce(c.c.value_json, NULL_JSON)
    in_gist = exists().where(*held)
    return or_(and_(c.c.value.is_(True), in_gist), and_(c.c.value.is_(False), ~in_gist))


def _record(
    connection: Connection,
    engine: Engine,
    reading: int,
    key: str,
    trait: bool,
    result: RunResult,
    now: Any,
) -> None:
    """Make the reading ``key``'s acknowledged ledger: what Gist holds replaces what the
    state said, uncertainty is gone (Gist's value is known), and plans made against the old
    ledger are superseded (the next run plans afresh).

    A contact's email acknowledged since the reading started (a run of another key sent
    it, between its pages or while it was stopped) is newer than the page that read it:
    it is kept in ``contacts``, and is the email of the key's ledger rows."""
    h = gist_holdings
    mine = and_(h.c.reconcile_id == reading, h.c.key == key)
    run_id = result.run_id
    held_now = select(h.c.user_id).where(mine)
    started = select(reconciles.c.started_at).where(reconciles.c.id == reading).scalar_subquery()
    since = contacts.c.updated_at > started
    newer = select(contacts.c.email).where(contacts.c.user_id == h.c.user_id, since)
    email = func.coalesce(newer.scalar_subquery(), h.c.email, "")
    if trait:
        connection.execute(delete(memberships).where(memberships.c.audience_key == key))
        connection.execute(
            delete(trait_values).where(
                trait_values.c.trait_key == key, trait_values.c.user_id.not_in(held_now)
            )
        )
        statement = upsert(engine, trait_values)
        connection.execute(
            statement.from_select(
                ["trait_key", "user_id", "email", "value", "since", "last_run_id"],
                select(h.c.key, h.c.user_id, email, h.c.value, literal(now),
                       literal(run_id)).where(mine),
            ).on_conflict_do_update(
                index_elements=[trait_values.c.trait_key, trait_values.c.user_id],
                set_={c: statement.excluded[c] for c in ("email", "value", "last_run_id")},
            )
        )  # fmt: skip
    else:
        connection.execute(delete(trait_values).where(trait_values.c.trait_key == key))
        connection.execute(
            delete(memberships).where(
                memberships.c.audience_key == key, memberships.c.user_id.not_in(held_now)
            )
        )
        statement = upsert(engine, memberships)
        connection.execute(
            statement.from_select(
                ["audience_key", "user_id", "email", "since", "last_run_id"],
                select(h.c.key, h.c.user_id, email, literal(now), literal(run_id)).where(mine),
            ).on_conflict_do_update(
                index_elements=[memberships.c.audience_key, memberships.c.user_id],
                set_={c: statement.excluded[c] for c in ("email", "last_run_id")},
            )
        )  # fmt: skip
    connection.execute(delete(uncertain_members).where(uncertain_members.c.audience_key == key))
    connection.execute(
        update(changes)
        .where(changes.c.audience_key == key, changes.c.status == "pending")
        .values(status="superseded", event_status=None)
    )
    _drop_stale_events(connection, key, trait)
    # The email Gist holds for each user it knows.
    statement = upsert(engine, contacts)
    connection.execute(
        statement.from_select(
            ["user_id", "email", "updated_at", "last_run_id"],
            select(h.c.user_id, func.max(h.c.email), literal(now), literal(run_id))
            .where(mine, h.c.email.is_not(None))
            .group_by(h.c.user_id),
        ).on_conflict_do_update(
            index_elements=[contacts.c.user_id],
            set_={c: statement.excluded[c] for c in ("email", "updated_at", "last_run_id")},
            where=~since,
        )
    )


def _drop_stale_events(connection: Connection, key: str, trait: bool) -> None:
    """Owed track events of users whose value Gist no longer holds are not sent.

    An event still owed describes a change Gist acknowledged; if Gist now holds another
    value for that user (changed behind the tool's back), the event would announce a state
    Gist left, and arrive after it: an ``Audience Entered`` for a contact Gist holds out of
    the audience. When the user's latest acknowledged change disagrees with the ledger just
    read, every owed event of that user and key is dropped (``event_status`` NULL, the reason
    in ``event_error``); where Gist still holds that change's value, its events stay owed and
    go out in order. A later real entry or exit fires its own event as usual."""
    latest = (
        select(changes.c.user_id, func.max(changes.c.id).label("id"))
        .where(changes.c.audience_key == key, changes.c.status == "delivered")
        .group_by(changes.c.user_id)
        .subquery()
    )
    last = changes.alias("last")
    if trait:
        held = (
            select(trait_values.c.value)
            .where(trait_values.c.trait_key == key, trait_values.c.user_id == last.c.user_id)
            .scalar_subquery()
        )
        differs = func.coalesce(held, NULL_JSON) != func.coalesce(last.c.value_json, NULL_JSON)
    else:
        member = exists().where(
            memberships.c.audience_key == key, memberships.c.user_id == last.c.user_id
        )
        differs = or_(and_(last.c.value.is_(True), ~member), and_(last.c.value.is_(False), member))
    stale = select(last.c.user_id).join(latest, latest.c.id == last.c.id).where(differs)
    connection.execute(
        update(changes)
        .where(changes.c.audience_key == key, owed_event(), changes.c.user_id.in_(stale))
        .values(
            event_status=None,
            event_error="not sent: reconcile found Gist holding another value since",
        )
    )


def _recompute_drift(connection: Connection) -> None:
    """``email_drift`` anew: the contacts' emails moved to what Gist holds."""
    connection.execute(delete(email_drift))
    connection.execute(
        insert(email_drift).from_select(
            ["audience_key", "user_id"],
            union(  # not union all: each pair once, should a key hold both kinds
                select(memberships.c.audience_key, memberships.c.user_id).where(
                    memberships.c.user_id == contacts.c.user_id,
                    memberships.c.email != contacts.c.email,
                ),
                select(trait_values.c.trait_key, trait_values.c.user_id).where(
                    trait_values.c.user_id == contacts.c.user_id,
                    trait_values.c.email != contacts.c.email,
                    trait_values.c.value != NULL_JSON,
                ),
            ),
        )
    )
