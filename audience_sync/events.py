"""Track events (``send_track``): ``Audience Entered``/``Exited`` and ``Trait Computed`` sent to
Gist's ``POST /events`` once the contact change they describe was acknowledged."""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import Engine, and_, bindparam, func, or_, select
from sqlalchemy.engine import Connection

from audience_sync import lease
from audience_sync.errors import (
    AuthError,
    FailureKind,
    FatalApiError,
    FencedError,
    RetriableApiError,
)
from audience_sync.gist import GistClient, guarded_by
from audience_sync.ledger import AckBuffer, owed_event
from audience_sync.models import contacts
from audience_sync.models import member_changes as changes
from audience_sync.pacer import Attempt, Pacer

log = logging.getLogger(__name__)

PAGE = 1000


@dataclass(frozen=True)
class EventNames:
    """The event names of one audience or trait."""

    entered: str = "Audience Entered"
    exited: str = "Audience Exited"
    trait: str | None = None  # set for a computed trait: "Trait Computed" by default


def build_event(names: EventNames, row: Any) -> dict[str, Any]:
    """The ``POST /events`` body for one acknowledged change (a ``member_changes`` row)."""
    key = row.audience_key
    occurred_at = calendar.timegm(row.delivered_at.timetuple())  # stored as naive UTC
    if names.trait is not None:
        value = json.loads(row.value_json)
        name, properties = names.trait, {"trait_key": key, key: value}
    else:
        value = bool(row.value)
        name = names.entered if value else names.exited
        properties = {"audience_key": key, key: value}
    event = {
        "event_name": name,
        "user_id": row.user_id,
        "email": row.email,
        "occurred_at": occurred_at,
        "properties": properties,
    }
    if not row.email:
        del event["email"]  # not known (see ``gist.build_contact``): the user id names them
    return event


async def send_events(
    engine: Engine,
    client: GistClient,
    pacer: Pacer,
    names: Mapping[str, EventNames],
    max_concurrency: int,
    should_stop: Callable[[], str | None] = lambda: None,
    holder: lease.Holder | None = None,
) -> tuple[str, FailureKind] | None:
    """Send every owed event of the audiences in ``names``; returns why it stopped, if it
    did, and the kind of that failure.

    Owed: the change was delivered and its event is ``pending`` or ``failed`` (from this run
    or an earlier one). An event is marked ``delivered`` only after Gist's 2xx, and outcomes
    are saved as contact acknowledgements are (every ``ACK_BATCH``, at least every
    ``ACK_SECONDS``), so after a ``kill -9`` only the unsaved ones and those in flight are
    sent again. With a ``holder``, each event is fenced on its key's lease and each save
    renews the leases; once one is lost no more events are sent.
    """
    stop: str | None = None
    failure: FailureKind = "interrupted"  # the kind of ``stop``

    def halt(reason: str | None, kind: FailureKind) -> None:
        nonlocal stop, failure
        if stop is None and reason is not None:
            stop, failure = reason, kind

    slots = asyncio.Semaphore(max_concurrency)
    in_flight: set[asyncio.Task[None]] = set()
    latest: dict[tuple[str, str], asyncio.Task[None]] = {}  # each user's newest event task
    refused: set[tuple[str, str]] = set()  # (key, user) of an event Gist refused this run
    first_refusal: dict[str, tuple[str, str]] = {}  # key → the first refused user, and why
    refusals: Counter[str] = Counter()  # key → events Gist refused this run

    def save(outcomes: list[dict[str, Any]]) -> None:
        with lease.fenced(engine, holder, names) as (connection, held):
            if held != set(names):
                halt("; ".join(holder.loss().values()) if holder else "lease lost", "interrupted")
            _save_outcomes(connection, [o for o in outcomes if o["key"] in held])

    acks: AckBuffer[dict[str, Any]] = AckBuffer(save)

    async def send(row: Any, after: asyncio.Task[None] | None) -> None:
        key = row.audience_key
        try:
            if after is not None:
                # One user's events of a key go out one after another, in the order of
                # their changes: sent side by side, an older entry owed from an earlier
                # run could arrive after the exit that followed it.
                await asyncio.wait({after})
                if stop is not None:
                    return
            if (key, row.user_id) in refused:
                # An older event of this user and key was refused and stays owed: this one
                # waits for a later run too, to go out after it.
                return
            body = build_event(names[key], row)
            try:
                with guarded_by(lambda: holder.check([key]) if holder else None):
                    await pacer.call(lambda: client.push_event(body), Attempt())
                acks.add({"change_id": row.id, "key": key, "s": "delivered", "e": None})
            except FencedError as exc:
                halt(exc.reason, exc.failure)
            except AuthError as exc:
                halt(f"Gist refused the API key ({exc}); no more events were sent", exc.failure)
            except FatalApiError as exc:
                refused.add((key, row.user_id))
                first_refusal.setdefault(key, (row.user_id, str(exc)))
                refusals[key] += 1
                acks.add({"change_id": row.id, "key": key, "s": "failed", "e": str(exc)})
            except RetriableApiError as exc:
                halt(f"Gist unavailable for events: {exc}", exc.failure)
        except Exception as exc:  # a bug of ours: the run fails saying so, never in silence
            log.exception("could not send the event of change %s", row.id)
            halt(f"could not send the event of change {row.id}: {exc!r}", "internal")
        finally:
            slots.release()

    try:
        for row in _owed(engine, names):
            await slots.acquire()
            if stop is None:
                halt(should_stop(), "interrupted")
            if stop is not None:
                slots.release()
                break
            user = (row.audience_key, row.user_id)
            task = asyncio.create_task(send(row, latest.get(user)))
            latest[user] = task
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            task.add_done_callback(partial(_forget, latest, user))
            acks.flush_if_due()
        await asyncio.gather(*in_flight, return_exceptions=True)
    except BaseException:
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        await acks.abandon()
        raise
    await acks.flush()
    for refused_key, (refused_user, error) in first_refusal.items():
        # The run still succeeds (Gist holds every value it sent): said here, or a refusal
        # that recurs on every run would never be seen but in the history tables.
        n = refusals[refused_key]
        log.warning(
            "%s: Gist refused %d event%s (first: user %s: %s); still owed, sent again by "
            "the next run", refused_key, n, "" if n == 1 else "s", refused_user, error,
        )  # fmt: skip
    if stop is None:
        return None
    log.error(stop)
    return stop, failure


def _forget(
    latest: dict[tuple[str, str], asyncio.Task[None]], user: tuple[str, str], done: Any
) -> None:
    """Drop ``user``'s entry once its newest event task is done (none is waiting on it)."""
    if latest.get(user) is done:
        del latest[user]


def _owed(engine: Engine, names: Mapping[str, EventNames]) -> Iterator[Any]:
    """The owed events' changes, oldest first, read a page at a time: of each key, only
    changes of the kind it is configured as (a trait's value, an audience's entry or exit).
    An event of the other kind cannot be told in this key's names; it stays owed until the
    key's next plan drops it (``plan.start_plan``), as when a run refused to switch the
    key's kind while it still held values of the old one.

    Each carries the user's email as Gist last acknowledged it (``contacts``), not as it
    was when the change was planned: a change whose event is still owed when the source
    gives its user another email (Gist refused the event for the old one, say) announces it
    for the contact as Gist holds it now."""
    audiences = [key for key, named in names.items() if named.trait is None]
    traits = [key for key, named in names.items() if named.trait is not None]
    of_its_kind = or_(
        and_(changes.c.audience_key.in_(audiences), changes.c.value.is_not(None)),
        and_(changes.c.audience_key.in_(traits), changes.c.value_json.is_not(None)),
    )
    email = func.coalesce(contacts.c.email, changes.c.email).label("email")
    columns = [email if column.name == "email" else column for column in changes.c]
    after = 0
    while True:
        with engine.connect() as connection:
            rows = connection.execute(
                select(*columns)
                .outerjoin_from(changes, contacts, contacts.c.user_id == changes.c.user_id)
                .where(of_its_kind, owed_event(), changes.c.id > after)
                .order_by(changes.c.id)
                .limit(PAGE)
            ).all()
        if not rows:
            return
        yield from rows
        after = rows[-1].id


def _save_outcomes(connection: Connection, outcomes: Sequence[dict[str, Any]]) -> None:
    if outcomes:
        connection.execute(
            changes.update()
            .where(changes.c.id == bindparam("change_id"))
            .values(event_status=bindparam("s"), event_error=bindparam("e")),
            [{"change_id": o["change_id"], "s": o["s"], "e": o["e"]} for o in outcomes],
        )
