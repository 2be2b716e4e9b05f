"""The ledger's writes: what Gist acknowledged moves ``memberships``, ``trait_values`` and
``contacts``; a request about to go out makes its members uncertain; outcomes are saved in
batches, each save fenced on the run's leases."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Engine,
    Table,
    and_,
    bindparam,
    case,
    delete,
    null,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from audience_sync import lease
from audience_sync.db import upsert
from audience_sync.models import (
    NULL_JSON,
    audiences,
    contacts,
    email_drift,
    memberships,
    trait_values,
    uncertain_members,
)
from audience_sync.models import member_changes as changes

log = logging.getLogger(__name__)
T = TypeVar("T")

IN_LIST = 10_000  # values in one IN list of the saves' lookups (see _parts)
ACK_BATCH = 200  # results saved per transaction, at most...
ACK_SECONDS = 1.0  # ...and at least this often
# Outcomes that may wait behind a running save before sending pauses for it to end.
ACK_BACKLOG = 10 * ACK_BATCH
VACUUM_AFTER = 10_000  # settled changes after which uncertain_members is vacuumed


@dataclass(frozen=True)
class Change:
    """One pending row of ``member_changes``."""

    id: int
    run_id: int
    audience_key: str
    value: Any  # True/False for an audience, the decoded value for a trait
    email: str
    value_json: str | None = None  # set for a trait: the value as stored

    @property
    def is_trait(self) -> bool:
        return self.value_json is not None


@dataclass
class UserUpdate:
    """Every pending change of one user, sent as one request."""

    user_id: str
    changes: list[Change] = field(default_factory=list)

    @property
    def email(self) -> str:
        # The plan gives every change of a user the same, current email (plan.resolve_emails).
        return self.changes[0].email

    @property
    def properties(self) -> dict[str, Any]:
        return {c.audience_key: c.value for c in self.changes}


@dataclass(frozen=True)
class Result:
    """What became of one user's update."""

    update: UserUpdate
    delivered: bool
    refused: bool  # Gist answered a definite no (4xx): it did not apply the change
    attempts: int
    http_status: int | None
    error: str | None


def mark_uncertain(engine: Engine, page: Sequence[UserUpdate]) -> None:
    """Before sending a page, note that Gist's value for its members is about to be unknown.

    Whatever becomes of a request that got no answer (timeout, dropped connection, kill -9),
    the next runs then plan these members from "Gist may hold either value". A member
    already uncertain keeps its row, and with it the run that made it so: only rows this
    run added (``run_id`` = the change's run) are taken back when its request is refused
    or never sent.
    """
    rows = [
        {"audience_key": c.audience_key, "user_id": u.user_id, "email": c.email, "run_id": c.run_id}
        for u in page
        for c in u.changes
    ]
    if rows:
        with engine.begin() as connection:
            connection.execute(upsert(engine, uncertain_members).on_conflict_do_nothing(), rows)


def vacuum_uncertain(engine: Engine, settled: int) -> None:
    """After a delivery that settled at least ``VACUUM_AFTER`` changes, vacuum
    ``uncertain_members`` on PostgreSQL. Every change in flight had a row there, so a large
    delivery leaves as many dead index entries, which every later run's checks wade through
    (1M of them: 30 to 60 ms per look at an audience's uncertain members) until autovacuum
    comes by, or never where it is off. ``SKIP_LOCKED``: a table another process is
    vacuuming or analysing is left to it. Only an optimisation: a failure is logged."""
    if engine.dialect.name != "postgresql" or settled < VACUUM_AFTER:
        return
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM (ANALYZE, SKIP_LOCKED) uncertain_members")
    except SQLAlchemyError as exc:
        log.debug("uncertain_members not vacuumed: %s", exc)


def unmark_uncertain(
    connection: Connection, changed: Sequence[Change], user_ids: Sequence[str]
) -> None:
    """Take back the uncertainty this run added for changes Gist certainly did not apply
    (refused with a 4xx, or never sent): Gist holds what it held before."""
    pairs = [
        {"k": c.audience_key, "u": u, "r": c.run_id} for c, u in zip(changed, user_ids, strict=True)
    ]
    if pairs:
        table = uncertain_members
        connection.execute(
            delete(table).where(
                table.c.audience_key == bindparam("k"),
                table.c.user_id == bindparam("u"),
                table.c.run_id == bindparam("r"),
            ),
            pairs,
        )


def save_results(
    engine: Engine,
    results: Sequence[Result],
    now: datetime,
    holder: lease.Holder | None = None,
) -> set[str]:
    """Record results in one transaction: acknowledged changes move ``memberships``,
    ``trait_values`` and ``contacts``; refused ones take back this run's uncertainty.

    With a ``holder``, the transaction first renews its leases on the results' keys (the
    fence): results of a key whose lease was lost are not recorded (their members stay
    uncertain, so the next run plans them afresh). Returns the keys whose lease was lost.
    """
    keys = {c.audience_key for r in results for c in r.update.changes}
    with lease.fenced(engine, holder, keys) as (connection, held):
        kept = [
            replace(r, update=UserUpdate(r.update.user_id, changes))
            for r in results
            if (changes := [c for c in r.update.changes if c.audience_key in held])
        ]
        _save(connection, engine, kept, now)
    return keys - held


def _save(connection: Connection, engine: Engine, results: Sequence[Result], now: datetime) -> None:
    delivered = [r for r in results if r.delivered]
    acked = [(r.update.user_id, c) for r in delivered for c in r.update.changes]
    entries = [
        {"audience_key": c.audience_key, "user_id": u, "email": c.email, "since": now,
         "last_run_id": c.run_id}
        for u, c in acked
        if not c.is_trait and c.value
    ]  # fmt: skip
    values = [
        {"trait_key": c.audience_key, "user_id": u, "email": c.email, "value": c.value_json,
         "since": now, "last_run_id": c.run_id}
        for u, c in acked
        if c.is_trait
    ]  # fmt: skip
    # What Gist acknowledged for a key is all the key holds for that user, whichever kind
    # wrote it before: an audience value clears a trait's row and the other way round.
    not_members = [{"k": c.audience_key, "u": u} for u, c in acked if c.is_trait or not c.value]
    not_valued = [{"k": c.audience_key, "u": u} for u, c in acked if not c.is_trait]
    # Only an answer of Gist's that applied the change makes its value known again.
    settled = [{"k": c.audience_key, "u": u} for u, c in acked]
    emails = {u: {"user_id": u, "email": c.email, "updated_at": now, "last_run_id": c.run_id}
              for u, c in acked}  # fmt: skip
    refused = [(c, r.update.user_id) for r in results if r.refused for c in r.update.changes]
    statuses = [
        {
            "change_id": c.id,
            "status": "delivered" if r.delivered else "failed",
            "attempts": r.attempts,
            "http_status": r.http_status,
            "last_error": r.error,
            "delivered_at": now if r.delivered else None,
            "event_owed": r.delivered,
        }
        for r in results
        for c in r.update.changes
    ]
    _upsert(connection, engine, memberships, ["audience_key", "user_id"], entries,
            ["email", "last_run_id"])  # fmt: skip
    _upsert(connection, engine, trait_values, ["trait_key", "user_id"], values,
            ["email", "value", "since", "last_run_id"])  # fmt: skip
    for table, column, pairs in (
        (memberships, memberships.c.audience_key, not_members),
        (trait_values, trait_values.c.trait_key, not_valued),
        (uncertain_members, uncertain_members.c.audience_key, settled),
    ):
        if pairs:
            connection.execute(
                delete(table).where(
                    and_(column == bindparam("k"), table.c.user_id == bindparam("u"))
                ),
                pairs,
            )
    before = _contact_emails(connection, list(emails))
    _upsert(connection, engine, contacts, ["user_id"], list(emails.values()),
            ["email", "updated_at", "last_run_id"])  # fmt: skip
    sent = {u: c.email for u, c in acked}
    _save_drift(connection, engine, settled, {u: e for u, e in sent.items() if before.get(u) != e})
    if refused:
        unmark_uncertain(connection, [c for c, _ in refused], [u for _, u in refused])
    if statuses:
        connection.execute(
            changes.update()
            .where(changes.c.id == bindparam("change_id"))
            .values(
                status=bindparam("status"),
                attempts=bindparam("attempts"),
                http_status=bindparam("http_status"),
                last_error=bindparam("last_error"),
                delivered_at=bindparam("delivered_at"),
                # A track event is owed for a delivered change only.
                event_status=case(
                    (bindparam("event_owed", type_=Boolean), changes.c.event_status),
                    else_=null(),
                ),
            ),
            statuses,
        )


def owed_event() -> ColumnElement[bool]:
    """The ``member_changes`` rows whose track event is owed: the change was delivered (an
    event describes what Gist acknowledged; a refused or superseded change owes none) and
    its event is ``pending`` or ``failed``. Never NULL (a NULL ``event_status``, no event,
    makes it false), so its negation is safe too."""
    return and_(
        changes.c.status == "delivered",
        changes.c.event_status.is_not(None),
        changes.c.event_status.in_(["pending", "failed"]),
    )


def _contact_emails(connection: Connection, user_ids: Sequence[str]) -> dict[str, str]:
    """The emails Gist acknowledged last for these users, as ``contacts`` has them now."""
    found: dict[str, str] = {}
    for part in _parts(user_ids):
        rows = connection.execute(
            select(contacts.c.user_id, contacts.c.email).where(contacts.c.user_id.in_(part))
        )
        found.update((user_id, email) for user_id, email in rows)
    return found


def _parts(values: Sequence[str]) -> list[Sequence[str]]:
    """``values`` in slices of at most ``IN_LIST`` for an ``IN`` list: a save that waited on
    a slow state database holds every outcome that arrived meanwhile, and PostgreSQL takes
    at most 65,535 parameters in a statement (a 1M first sync in batches of 500 on a loaded
    machine passed it, and the run stopped)."""
    return [values[start : start + IN_LIST] for start in range(0, len(values), IN_LIST)]


def _save_drift(
    connection: Connection,
    engine: Engine,
    settled: Sequence[dict[str, str]],
    changed: dict[str, str],
) -> None:
    """Keep ``email_drift`` true: a member (or a trait's value) acknowledged now carries the
    contact's email; when a contact's email changed, its members and values under other
    keys drift from it (or agree with it again). Those are looked up through the
    memberships' and the trait values' keys."""
    if settled:
        connection.execute(
            delete(email_drift).where(
                email_drift.c.audience_key == bindparam("k"),
                email_drift.c.user_id == bindparam("u"),
            ),
            settled,
        )
    if not changed:
        return
    keys = list(connection.scalars(select(audiences.c.key)))
    valued = trait_values.c.value != NULL_JSON  # no value: nothing to send again
    held = [
        row
        for part in _parts(list(changed))
        for query in (
            select(memberships.c.audience_key, memberships.c.user_id, memberships.c.email).where(
                memberships.c.audience_key.in_(keys), memberships.c.user_id.in_(part)
            ),
            select(trait_values.c.trait_key, trait_values.c.user_id, trait_values.c.email).where(
                trait_values.c.trait_key.in_(keys), trait_values.c.user_id.in_(part), valued
            ),
        )
        for row in connection.execute(query)
    ]
    drifted = [{"audience_key": k, "user_id": u} for k, u, e in held if e != changed[u]]
    agreed = [{"k": k, "u": u} for k, u, e in held if e == changed[u]]
    if drifted:
        connection.execute(upsert(engine, email_drift).on_conflict_do_nothing(), drifted)
    if agreed:
        connection.execute(
            delete(email_drift).where(
                email_drift.c.audience_key == bindparam("k"),
                email_drift.c.user_id == bindparam("u"),
            ),
            agreed,
        )


def _upsert(
    connection: Connection,
    engine: Engine,
    table: Table,
    keys: list[str],
    rows: list[dict[str, Any]],
    columns: list[str],
) -> None:
    """Insert ``rows`` into ``table``, or set ``columns`` of the rows whose ``keys`` exist."""
    if rows:
        statement = upsert(engine, table)
        connection.execute(
            statement.on_conflict_do_update(
                index_elements=[table.c[k] for k in keys],
                set_={c: statement.excluded[c] for c in columns},
            ),
            rows,
        )


class AckBuffer(Generic[T]):
    """Outcomes waiting to be saved: saved every ``ACK_BATCH`` of them and at least every
    ``ACK_SECONDS``, so after a ``kill -9`` only the unsaved ones are sent again.

    Saves run in a worker thread, one at a time, so the event loop keeps sending (and
    keeps its pace steady) while the state database writes.
    """

    def __init__(self, save: Callable[[list[T]], None]) -> None:
        self._save = save
        self._items: list[T] = []
        self._next_flush = time.monotonic() + ACK_SECONDS
        self._saving: asyncio.Task[None] | None = None

    def add(self, item: T) -> None:
        self._items.append(item)

    def flush_if_due(self) -> None:
        """Start saving the outcomes when there are enough of them or enough time has
        passed, unless a save is still running; a save that failed raises here."""
        if self._saving is not None:
            if not self._saving.done():
                return
            saving, self._saving = self._saving, None
            saving.result()
        if len(self._items) >= ACK_BATCH or time.monotonic() >= self._next_flush:
            self._next_flush = time.monotonic() + ACK_SECONDS
            items, self._items = self._items, []
            if items:
                self._saving = asyncio.create_task(asyncio.to_thread(self._save, items))

    async def keep_up(self) -> None:
        """Wait for the running save while more than ``ACK_BACKLOG`` outcomes wait behind
        it, then start saving them: sending never outruns recording what it sent. (Saves
        run in a thread that a busy event loop starves; each save then found more outcomes
        waiting than the last and took longer, holding the leases' rows it renews, until
        the lease heartbeat waited 30 s behind one and the fence stopped a 1M delivery.)
        A failed save raises here."""
        while len(self._items) > ACK_BACKLOG and self._saving is not None:
            # wait() leaves the save in place: cancelled here, ``abandon`` still waits for it.
            await asyncio.wait([self._saving])
            self.flush_if_due()

    async def flush(self) -> None:
        """Wait for the running save, then save what is left."""
        if self._saving is not None:
            saving, self._saving = self._saving, None
            await saving
        items, self._items = self._items, []
        if items:
            await asyncio.to_thread(self._save, items)

    async def abandon(self) -> None:
        """Let a running save end (its outcome is lost with the rest, as in a kill)."""
        if self._saving is not None:
            saving, self._saving = self._saving, None
            await asyncio.gather(saving, return_exceptions=True)
