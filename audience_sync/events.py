"""Track events (``send_track``): ``Audience Entered``/``Exited`` and ``Trait Computed`` sent to
Gist's ``POST /events`` once the contact change they describe was acknowledged."""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, bindparam, select

from audience_sync.delivery import Attempt, Pacer
from audience_sync.errors import AuthError, FatalApiError, RetriableApiError
from audience_sync.gist import GistClient
from audience_sync.models import member_changes as changes

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
    return {
        "event_name": name,
        "user_id": row.user_id,
        "email": row.email,
        "occurred_at": occurred_at,
        "properties": properties,
    }


async def send_events(
    engine: Engine,
    client: GistClient,
    pacer: Pacer,
    names: Mapping[str, EventNames],
    max_concurrency: int,
    should_stop: Callable[[], str | None] = lambda: None,
) -> str | None:
    """Send every owed event of the audiences in ``names``; returns why it stopped, if it did.

    Owed: the change was delivered and its event is ``pending`` or ``failed`` (from this run
    or an earlier one). An event is marked ``delivered`` only after Gist's 2xx, so a crash or
    an outage leaves it owed, and an acknowledged one is never sent again.
    """
    after = 0
    stop: str | None = None
    slots = asyncio.Semaphore(max_concurrency)
    while stop is None:
        with engine.connect() as connection:
            rows = connection.execute(
                select(changes)
                .where(
                    changes.c.audience_key.in_(list(names)),
                    changes.c.status == "delivered",
                    changes.c.event_status.in_(["pending", "failed"]),
                    changes.c.id > after,
                )
                .order_by(changes.c.id)
                .limit(PAGE)
            ).all()
        if not rows:
            break
        after = rows[-1].id
        outcomes: list[dict[str, Any]] = []

        async def send(row: Any, outcomes: list[dict[str, Any]]) -> None:
            nonlocal stop
            async with slots:
                if stop is not None or (stop := should_stop()) is not None:
                    return
                body = build_event(names[row.audience_key], row)
                try:
                    await pacer.call(lambda: client.push_event(body), Attempt())
                    outcomes.append({"change_id": row.id, "s": "delivered", "e": None})
                except AuthError as exc:
                    stop = f"Gist refused the API key ({exc}); no more events were sent"
                except FatalApiError as exc:
                    outcomes.append({"change_id": row.id, "s": "failed", "e": str(exc)})
                except RetriableApiError as exc:
                    stop = f"Gist unavailable for events: {exc}"

        await asyncio.gather(*(send(row, outcomes) for row in rows))
        _save_outcomes(engine, outcomes)
    if stop is not None:
        log.error(stop)
    return stop


def _save_outcomes(engine: Engine, outcomes: Sequence[dict[str, Any]]) -> None:
    if outcomes:
        with engine.begin() as connection:
            connection.execute(
                changes.update()
                .where(changes.c.id == bindparam("change_id"))
                .values(event_status=bindparam("s"), event_error=bindparam("e")),
                outcomes,
            )
