"""One Gist workspace's rate limit, shared by every process that syncs into it.

Send times are a schedule with one slot per ``interval`` seconds. The part of it no process
has claimed yet starts at ``rate_limits.next_free`` (the **database's** clock, Unix
seconds). A process claims a block of slots in one atomic ``UPDATE … RETURNING``: the block
starts at ``max(next_free, now)`` and ``next_free`` moves past its end. Blocks never
overlap, so however many daemons, hosts and ``run``s share the state database, together
they use at most one slot per interval; a block covers ``BLOCK_SECONDS`` of sending, so the
database is asked a few times a second, not once per request.

The answer carries the database's "now", which fell before the answer arrived: the pacer
maps database time onto its own monotonic clock with the tightest such bound seen so far
(one mapping for all its blocks, so its own blocks join seamlessly), which never puts a
slot earlier than the database has it, and clocks that disagree between hosts do not
matter. It sends exactly ``slots`` requests per block, ``interval`` apart from its start.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

from sqlalchemy import (
    ColumnElement,
    Engine,
    Float,
    and_,
    case,
    cast,
    func,
    literal_column,
    or_,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.config import GistConfig
from audience_sync.db import upsert
from audience_sync.models import rate_limits

log = logging.getLogger(__name__)

BLOCK_SECONDS = 0.25  # of sending claimed at a time
# A schedule more than one window off the database's clock was not left by claims of
# processes sending now (those claim every fraction of a second): it was left by a clock
# that stepped back, and waiting for it would send nothing for as long as the step.
AHEAD_SECONDS = 1.0


def workspace_id(gist: GistConfig) -> str:
    """The budget's name for the workspace ``gist`` reaches: a hash of its base URL and API
    key (the key itself is never stored)."""
    digest = hashlib.sha256(b"audience-sync rate limit\0")
    digest.update(gist.base_url.rstrip("/").encode())
    digest.update(b"\0")
    digest.update(gist.api_key.get_secret_value().encode())
    return digest.hexdigest()[:32]


def workspace_budget(engine: Engine, gist: GistConfig) -> SharedBudget:
    """The budget of the workspace ``gist`` reaches, kept in ``engine``'s state database."""
    return SharedBudget(engine, workspace_id(gist))


def block_slots(requests_per_second: float) -> int:
    """How many slots one claim takes at this rate."""
    return max(1, math.ceil(requests_per_second * BLOCK_SECONDS))


@dataclass(frozen=True)
class Block:
    """Claimed slots: ``slots`` of them, ``interval`` apart from ``start`` (database time,
    Unix seconds); ``end`` is where the claim left ``next_free``. ``at`` is the database's
    time when it answered and ``answered`` this process's ``time.monotonic()`` when the
    answer came: that "now" fell before ``answered``, which places the block on this
    process's clock never earlier than the database has it. ``shared`` is True when another
    process had claimed the slots just before it."""

    start: float
    slots: int
    interval: float
    end: float
    at: float
    answered: float
    shared: bool = False


class SharedBudget:
    """The workspace's schedule in the state database (see the module's docstring)."""

    def __init__(self, engine: Engine, workspace: str) -> None:
        self._engine = engine
        self._workspace = workspace
        self._created = False
        self._last_end: float | None = None  # where this budget's previous block ended

    def claim(self, slots: int, interval: float) -> Block:
        """Claim the next ``slots`` free slots; blocks until the database answers."""
        now = database_seconds(self._engine.dialect.name)
        span = slots * interval
        with self._engine.begin() as connection:
            if not self._created:
                connection.execute(
                    upsert(self._engine, rate_limits)
                    .values(workspace=self._workspace, next_free=0.0)
                    .on_conflict_do_nothing()
                )
            claim = (
                update(rate_limits)
                .where(rate_limits.c.workspace == self._workspace)
                .values(next_free=_start(self._engine, now) + span, claimed_at=now)
                .returning(rate_limits.c.next_free, now)
            )
            end, at = connection.execute(claim).one()
            answered = time.monotonic()
        self._created = True
        start = end - span
        # The schedule ran ahead of "now", and not because of our own previous block:
        # another process is sending to the workspace too.
        # (Less than two slots ahead is a rest of our own: a block given back keeps the
        # part of a slot that was under way.)
        shared = start > at + 2 * interval and (
            self._last_end is None or abs(start - self._last_end) > 1e-6
        )
        self._last_end = end
        return Block(
            start=max(start, at), slots=slots, interval=interval, end=end, at=at,
            answered=answered, shared=shared,
        )  # fmt: skip

    def give_back(self, block: Block, unused: int) -> None:
        """Return the last ``unused`` slots of ``block`` when no one claimed after it (a
        process that stops sending leaves no gap in everyone else's schedule)."""
        if unused <= 0:
            return
        try:
            with self._engine.begin() as connection:
                connection.execute(
                    update(rate_limits)
                    .where(
                        rate_limits.c.workspace == self._workspace,
                        rate_limits.c.next_free == block.end,
                    )
                    .values(next_free=block.end - unused * block.interval)
                )
        except SQLAlchemyError as exc:  # only an optimisation: the slots are simply lost
            log.debug("unused send slots not given back: %s", exc)


def _start(engine: Engine, now: ColumnElement[float]) -> ColumnElement[float]:
    """Where a claim made at the database's ``now`` starts: ``max(next_free, now)``, unless
    the schedule is off the clock. The last claim was made more than a window after now: the
    clock stepped back since, and the schedule moves back with it. Or the schedule runs more
    than a window ahead while no one claimed for a window: it is left by a step no claim
    recorded, and starts afresh at now. Claims of processes sending together stay exact."""
    table = rate_limits.c
    window = AHEAD_SECONDS
    return case(
        (
            table.claimed_at > now + window,
            _greatest(engine, table.next_free - (table.claimed_at - now), now),
        ),
        (
            and_(
                table.next_free > now + window,
                or_(table.claimed_at.is_(None), table.claimed_at < now - window),
            ),
            now,
        ),
        else_=_greatest(engine, table.next_free, now),
    )


def database_seconds(dialect: str) -> ColumnElement[float]:
    """The database's current time in Unix seconds (fractions included). Read twice in one
    claim (the new ``next_free``, then the answer) it may move on in between: the block
    then looks a little later than it is, never earlier."""
    if dialect == "sqlite":
        # julianday('now') is fixed for the whole statement (taken once it runs, after any
        # wait for the write lock), to the millisecond.
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Float)
    # The clock's time when evaluated, not the statement's start: an UPDATE that waited for
    # another claim's row lock reads it after the wait.
    return cast(func.extract("epoch", func.clock_timestamp()), Float)


def _greatest(
    engine: Engine, a: ColumnElement[float], b: ColumnElement[float]
) -> ColumnElement[float]:
    # SQLite's two-argument max() is scalar; PostgreSQL calls it greatest().
    if engine.dialect.name == "sqlite":
        return func.max(a, b, type_=Float)
    return func.greatest(a, b, type_=Float)
