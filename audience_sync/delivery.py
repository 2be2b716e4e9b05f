"""Sending a run's plan to Gist: one request per user, bounded concurrency, rate limit,
retries with back-off, and acknowledgements saved into ``memberships`` in batches."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine, Table, and_, bindparam, delete, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from audience_sync import lease
from audience_sync.budget import Block, SharedBudget, block_slots
from audience_sync.config import GistConfig
from audience_sync.db import upsert
from audience_sync.errors import AuthError, FatalApiError, RetriableApiError, UnreachableError
from audience_sync.gist import GistClient, on_wire
from audience_sync.models import contacts, memberships, trait_values, uncertain_members
from audience_sync.models import member_changes as changes

log = logging.getLogger(__name__)
T = TypeVar("T")

PAGE_ROWS = 2000  # pending changes read per page, ordered by user
ACK_BATCH = 200  # results saved per transaction, at most...
ACK_SECONDS = 1.0  # ...and at least this often
MAX_BACKOFF = 60.0
MAX_RETRY_AFTER = 600.0
PACE_SHARE = 0.995  # of requests_per_second actually used
# ...and while other processes send to the workspace too: no window of theirs sees our
# requests, so the schedule itself leaves room for ~30 ms of jitter between processes.
FLEET_PACE_SHARE = 0.97
# A block's next one is claimed when this little of it is left (a claim takes milliseconds).
CLAIM_AHEAD_SECONDS = 0.1
FLEET_MEMORY = 5.0  # seconds a block shared with another process keeps the fleet pace
WINDOW_MARGIN = 1.02
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


@dataclass
class DeliveryReport:
    """How delivery ended: ``error`` is set when it stopped before sending everything."""

    requests: int = 0
    error: str | None = None
    interrupted: bool = False  # stopped on request (or a lost lease) rather than by a failure


def iter_pages(engine: Engine, run_ids: Sequence[int]) -> Iterator[list[UserUpdate]]:
    """Pending changes of ``run_ids`` grouped by user, a page at a time (never all at once)."""
    after: str | None = None
    while True:
        query = (
            select(
                changes.c.id,
                changes.c.run_id,
                changes.c.audience_key,
                changes.c.user_id,
                changes.c.email,
                changes.c.value,
                changes.c.value_json,
            )
            .where(changes.c.run_id.in_(run_ids), changes.c.status == "pending")
            .order_by(changes.c.user_id, changes.c.id)
            .limit(PAGE_ROWS)
        )
        if after is not None:
            query = query.where(changes.c.user_id > after)
        with engine.connect() as connection:
            rows = connection.execute(query).all()
        if not rows:
            return
        full_page = len(rows) == PAGE_ROWS
        if full_page and rows[0].user_id != rows[-1].user_id:
            # The last user's changes may continue on the next page: leave them for it.
            last = rows[-1].user_id
            rows = [r for r in rows if r.user_id != last]
        page: list[UserUpdate] = []
        for row in rows:
            if not page or page[-1].user_id != row.user_id:
                page.append(UserUpdate(row.user_id))
            page[-1].changes.append(
                Change(
                    row.id,
                    row.run_id,
                    row.audience_key,
                    bool(row.value) if row.value_json is None else json.loads(row.value_json),
                    row.email,
                    row.value_json,
                )
            )
        yield page
        after = page[-1].user_id
        if not full_page:
            return


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
    engine: Engine, results: Sequence[Result], now: datetime, owner: str | None = None
) -> set[str]:
    """Record results in one transaction: acknowledged changes move ``memberships``,
    ``trait_values`` and ``contacts``; refused ones take back this run's uncertainty.

    With ``owner``, the transaction first renews that owner's leases on the results' keys
    (the fence): results of a key whose lease was lost are not recorded (their members stay
    uncertain, so the next run plans them afresh). Returns the keys whose lease was lost.
    """
    keys = {c.audience_key for r in results for c in r.update.changes}
    with engine.begin() as connection:
        lost: set[str] = set()
        if owner is not None:
            lost = keys - lease.renew(connection, keys, owner)
        if lost:
            results = [
                Result(
                    UserUpdate(
                        r.update.user_id,
                        [c for c in r.update.changes if c.audience_key not in lost],
                    ),
                    r.delivered,
                    r.refused,
                    r.attempts,
                    r.http_status,
                    r.error,
                )
                for r in results
            ]
        _save(connection, engine, [r for r in results if r.update.changes], now)
    return lost


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
    _upsert(connection, engine, contacts, ["user_id"], list(emails.values()),
            ["email", "updated_at", "last_run_id"])  # fmt: skip
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
            ),
            statuses,
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


@dataclass
class Attempt:
    """Counts the tries of one call, including the one that raised."""

    count: int = 0


def allowed_lateness(interval: float, requests_per_second: float) -> float:
    """How long after its slot a request sharing a workspace's schedule may still take it,
    with slots ``interval`` apart for a limit of ``requests_per_second``.

    Half an interval keeps every request nearer its own slot than any other's; at a high
    rate that is less than an event loop's wake-up (0.05 ms at 10,000/s: nearly every
    sleeper gave its slot up, again and again, and delivery lost 15%), so there the pace's
    own margin bounds it. Slots leave ``1 - share`` of every second free; requests late by
    at most ``(1 - share) - 2 * interval`` still keep every second under the limit, and half
    of that is allowed, the other half left for the network's jitter (2.4 ms at 10,000/s
    alone, 15 ms beside other processes; at 50/s half an interval, 10 ms, is the larger).
    """
    share = 1 / (interval * requests_per_second)
    return max(interval / 2, ((1 - share) - 2 * interval) / 2)


class Pacer:
    """The rate limit and retry policy shared by everything that calls Gist.

    Every try, retries included, takes the next send slot of a fixed schedule, one per
    ``1 / requests_per_second`` seconds: a steady pace that never bursts and, unlike a
    leaky bucket woken by timers, does not drift below the rate. With a ``budget`` (the
    workspace's schedule in the state database, see ``budget``) the slots come from blocks
    claimed there, so every process sending to the workspace shares the one rate; without
    one, the schedule is this pacer's alone. 429, 408, 5xx, timeouts and dropped
    connections are retried up to ``max_retries`` times, waiting what ``Retry-After`` says,
    else an exponential back-off with jitter.

    ``monotonic`` and ``sleep`` are the clock it reads and waits on (a test passes a fake
    pair, so "never over the rate in any second" is checked in simulated time); with a
    ``budget`` they must be the real ones, which the budget's blocks are placed on.
    """

    def __init__(
        self,
        config: GistConfig,
        *,
        budget: SharedBudget | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._budget = budget
        self._monotonic = monotonic
        self._sleep = sleep
        # Just under the configured rate: a server whose own limit equals it must never see
        # one request too many in any second, whatever the network's jitter.
        rate = config.requests_per_second
        self._interval = 1 / (rate * PACE_SHARE)
        self._fleet_interval = 1 / (rate * FLEET_PACE_SHARE)
        self._next_slot = 0.0
        # The block of shared slots being used, its next unused slot, and until when the
        # fleet pace holds (another process was seen sending).
        self._block: Block | None = None
        self._block_next = 0
        self._ahead: asyncio.Task[Block] | None = None  # the next block, claimed ahead
        self._offset: float | None = None  # database time minus this process's
        self._fleet_until = 0.0
        self._taking = asyncio.Lock()
        # A sliding window as a server keeps one, slightly longer than a second so network
        # jitter cannot squeeze one request too many into the server's own window.
        self._window = WINDOW_MARGIN * max(1.0, 1 / rate)
        self._window_limit = max(1, int(rate * max(1.0, 1 / rate)))
        # When each request of the last window left: [time], moved on when it hit the wire.
        self._sent: deque[list[float]] = deque()

    async def take_slot(self) -> list[float]:
        """Wait for the next send slot; returns its entry in the window, whose time
        ``call`` moves to when the request actually left."""
        while True:
            async with self._taking:
                # A slot left unused for a while is not banked: that would allow a burst.
                slot = max(self._monotonic(), self._next_slot)
                if self._budget is not None:
                    slot = await self._shared_slot(slot)
                self._next_slot = slot + self._interval
            now = self._monotonic()
            if slot > now:
                await self._sleep(slot - now)
                now = self._monotonic()
            # Woken well after its slot (a busy event loop), a request would go out together
            # with the next ones, right against the other processes' slots, which no window
            # of ours sees: with a shared budget it gives the slot up and takes the next.
            if self._budget is None or now - slot <= self._lateness:
                break
        # Tasks held up together (a busy event loop) would wake together: the window keeps
        # such a bunch from exceeding the rate over any second.
        while True:
            now = self._monotonic()
            # A nanosecond of slack: without it, rounding can leave a request a hair inside
            # the window at the very moment it should leave it, and the wait rounds to 0.
            # An entry moved later (below) may hold back an older one behind it: the window
            # then counts a request too many, never one too few.
            while self._sent and self._sent[0][0] + self._window <= now + 1e-9:
                self._sent.popleft()
            if len(self._sent) < self._window_limit:
                break
            await self._sleep(self._sent[0][0] + self._window - now)
        entry = [now]
        self._sent.append(entry)
        return entry

    async def _shared_slot(self, earliest: float) -> float:
        """The first slot at or after ``earliest`` of a block claimed from the budget: a
        block's ``slots`` slots lie ``interval`` apart from its start, each used once."""
        assert self._budget is not None
        index = self._slot_index(earliest)
        fresh = False
        while not fresh and (self._block is None or index >= self._block.slots):
            # The block claimed ahead, unless it passed unused meanwhile: then a fresh one.
            ahead, self._ahead = self._ahead, None
            fresh = ahead is None
            block = await (ahead or self._claim())
            if block.shared:
                self._fleet_until = block.answered + FLEET_MEMORY
                if block.interval < self._fleet_interval:
                    # Claimed at our own pace before we knew: the same stretch, fewer slots.
                    fewer = int(block.slots * block.interval / self._fleet_interval + 1e-9)
                    block = replace(block, slots=max(1, fewer), interval=self._fleet_interval)
            self._block = block
            self._block_next = 0
            # Database time minus ours: the database's "now" came before the answer did,
            # so this bound never places a slot early; the tightest one seen is kept.
            bound = block.at - block.answered
            self._offset = bound if self._offset is None else max(self._offset, bound)
            index = self._slot_index(earliest)
        current = self._block
        assert current is not None
        self._block_next = index + 1
        slot = self._local_start + index * current.interval
        # The next block is claimed while this one still lasts: a claim is a database round
        # trip, and every sender would wait for it at the block's end.
        ends = self._local_start + current.slots * current.interval
        if self._ahead is None and ends - earliest < CLAIM_AHEAD_SECONDS:
            self._ahead = asyncio.ensure_future(self._claim())
        return slot

    async def _claim(self) -> Block:
        assert self._budget is not None
        interval = self._fleet_interval if self._fleet else self._interval
        slots = block_slots(self._config.requests_per_second)
        return await asyncio.to_thread(self._budget.claim, slots, interval)

    @property
    def _local_start(self) -> float:
        assert self._block is not None
        assert self._offset is not None
        return self._block.start - self._offset

    def _slot_index(self, earliest: float) -> int:
        """The current block's first unused slot at or after ``earliest`` (past ones are
        not banked)."""
        if self._block is None:
            return 0
        behind = (earliest - self._local_start) / self._block.interval
        # A thousandth of a slot of slack: epoch seconds in a double are only good to a
        # microsecond or so, and a slot due "now" must not round to the next one.
        return max(self._block_next, math.ceil(behind - 1e-3))

    @property
    def _lateness(self) -> float:
        return allowed_lateness(self._block_interval, self._config.requests_per_second)

    @property
    def _block_interval(self) -> float:
        return self._block.interval if self._block is not None else self._interval

    @property
    def _fleet(self) -> bool:
        return self._monotonic() < self._fleet_until

    async def close(self) -> None:
        """Give the block claimed ahead and the unused rest of the current one back to the
        budget (the later one first: a block goes back only while it is the last claimed)."""
        if self._budget is None:
            return
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            try:
                block = await ahead
            except Exception as exc:  # a claim no one waits for any more
                log.debug("claiming send slots ahead failed: %s", exc)
            else:
                await asyncio.to_thread(self._budget.give_back, block, block.slots)
        if self._block is None:
            return
        block, unused = self._block, self._block.slots - self._slot_index(self._monotonic())
        self._block = None
        await asyncio.to_thread(self._budget.give_back, block, unused)

    async def call(self, request: Callable[[], Awaitable[T]], attempt: Attempt | None = None) -> T:
        """Await ``request()`` under the rate limit, retrying transient failures."""
        attempt = attempt or Attempt()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._config.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(RetriableApiError),
            reraise=True,
            sleep=self._sleep,
        )
        async for try_ in retrying:
            with try_:
                attempt.count = try_.retry_state.attempt_number
                entry = await self.take_slot()

                def left(entry: list[float] = entry) -> None:
                    entry[0] = max(entry[0], self._monotonic())

                with on_wire(left):
                    return await request()
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RetriableApiError) and error.retry_after is not None:
            return min(error.retry_after, MAX_RETRY_AFTER)
        # Exponential back-off with full-size jitter, so retrying workers do not move in step.
        base = self._config.retry_backoff_seconds
        backoff: float = min(MAX_BACKOFF, base * 2 ** (state.attempt_number - 1))
        return backoff + random.uniform(0, base)


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


class Deliverer:
    """Sends the pending updates of a set of runs and records every outcome."""

    def __init__(
        self,
        engine: Engine,
        client: GistClient,
        config: GistConfig,
        clock: Callable[[], datetime],
        should_stop: Callable[[], str | None] = lambda: None,
        on_result: Callable[[int], None] = lambda changes: None,
        *,
        owner: str | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self._engine = engine
        self._client = client
        self._config = config
        self._clock = clock
        self._should_stop = should_stop
        self._on_result = on_result
        self._owner = owner
        self._pacer = pacer or Pacer(config)
        self._acks: AckBuffer[Result] = AckBuffer(self._save)
        self._report = DeliveryReport()
        self._crash: Exception | None = None
        self._unsent: dict[int, tuple[Change, str]] = {}  # marked uncertain, not yet sent

    async def run(self, run_ids: Sequence[int]) -> DeliveryReport:
        """Deliver every pending change of ``run_ids``.

        Stops early, cancelling what is in flight, when Gist refuses the key or stays down;
        stops gracefully, letting in-flight requests finish and be recorded, when
        ``should_stop`` gives a reason (a signal) or a lease is lost (then nothing more of
        that audience is recorded).
        """
        slots = asyncio.Semaphore(self._config.max_concurrency)
        in_flight: set[asyncio.Task[None]] = set()
        pages = iter_pages(self._engine, run_ids)
        try:
            # The state database is read and written from a worker thread: the event loop
            # only sends, so its pace never stalls on a query.
            while (page := await asyncio.to_thread(next, pages, None)) is not None:
                if self._report.error is not None:
                    break
                await asyncio.to_thread(mark_uncertain, self._engine, page)
                self._unsent.update((c.id, (c, u.user_id)) for u in page for c in u.changes)
                size = self._config.batch_size
                for batch in (page[i : i + size] for i in range(0, len(page), size)):
                    await slots.acquire()
                    if self._report.error is None and (reason := self._should_stop()):
                        log.warning("stopping: %s; letting %d finish", reason, len(in_flight))
                        self._report.error, self._report.interrupted = reason, True
                    if self._report.error is not None:
                        slots.release()
                        break
                    for update in batch:
                        for change in update.changes:
                            self._unsent.pop(change.id, None)
                    task = asyncio.create_task(self._send(batch, slots))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    self._acks.flush_if_due()
        except BaseException:
            # Our own failure (the state database, say): no request may outlive this method
            # and its HTTP client; what they would have acknowledged is simply sent again.
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            await self._acks.abandon()
            raise
        if self._report.error is not None and not self._report.interrupted:
            for task in in_flight:
                task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        await self._acks.flush()
        await asyncio.to_thread(self._take_back_unsent)
        if self._crash is not None:
            raise self._crash
        return self._report

    async def _send(self, batch: list[UserUpdate], slots: asyncio.Semaphore) -> None:
        """Send one batch (one user when ``batch_size`` is 1), holding one slot."""
        try:
            if len(batch) > 1:
                batch = await self._send_batch(batch)
            for update in batch:
                if self._report.error is not None and not self._report.interrupted:
                    return
                await self._send_one(update)
        finally:
            slots.release()

    async def _send_batch(self, batch: list[UserUpdate]) -> list[UserUpdate]:
        """``POST /contacts/batch``; returns the updates still to send one by one.

        Contacts the batch's 2xx answer names as failed, and every contact of a batch answered
        otherwise (but for a refused key), are sent one by one, so each gets its own answer
        and one bad contact cannot hold back the others.
        """
        attempt = Attempt()
        try:
            answer = await self._pacer.call(
                lambda: self._client.push_contacts(
                    [(u.user_id, u.email, u.properties) for u in batch]
                ),
                attempt,
            )
        except AuthError as exc:
            self._stop(f"Gist refused the API key ({exc}); nothing more was sent")
            return []
        except UnreachableError as exc:
            self._stop(f"{exc}; nothing more was sent")
            return []
        except (FatalApiError, RetriableApiError) as exc:
            log.info("batch of %d refused (%s): sending one by one", len(batch), exc)
            return batch
        finally:
            self._report.requests += attempt.count
        if answer.failed is None:
            log.info("batch answer names errors it does not attribute: sending one by one")
            return batch
        retry = [u for i, u in enumerate(batch) if i in answer.failed]
        for index, update in enumerate(batch):
            if index not in answer.failed:
                self._acks.add(Result(update, True, False, attempt.count, answer.status, None))
                self._on_result(len(update.changes))
        return retry

    async def _send_one(self, update: UserUpdate) -> None:
        attempt = Attempt()
        try:
            status = await self._pacer.call(
                lambda: self._client.push_contact(update.user_id, update.email, update.properties),
                attempt,
            )
            self._acks.add(Result(update, True, False, attempt.count, status, None))
        except AuthError as exc:
            # The key is refused: every later request would be too; this one was not applied.
            self._acks.add(Result(update, False, True, attempt.count, exc.status, str(exc)))
            self._stop(f"Gist refused the API key ({exc}); nothing more was sent")
        except UnreachableError as exc:
            # A wrong scheme or TLS set-up: no request gets through, so none is retried; this
            # one never reached Gist.
            self._acks.add(Result(update, False, True, attempt.count, None, str(exc)))
            self._stop(f"{exc}; nothing more was sent")
        except FatalApiError as exc:
            self._acks.add(Result(update, False, True, attempt.count, exc.status, str(exc)))
        except RetriableApiError as exc:
            # Still failing after every retry: Gist is down or overloaded. Stop; the next
            # run re-plans whatever was not acknowledged.
            self._acks.add(Result(update, False, False, attempt.count, exc.status, str(exc)))
            self._stop(f"Gist unavailable after {attempt.count} attempts: {exc}")
        except Exception as exc:
            # A bug or a broken database, not Gist: stop and let run() re-raise it.
            self._crash = exc
            self._stop(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._report.requests += attempt.count
            self._on_result(len(update.changes))

    def _stop(self, reason: str) -> None:
        if self._report.error is None:
            # INFO: the reason becomes each run's error, which the CLI and daemon report.
            log.info(reason)
            self._report.error = reason

    def _save(self, results: list[Result]) -> None:
        lost = save_results(self._engine, results, self._clock(), self._owner)
        if lost and self._report.error is None:
            reason = f"lost the lease of {', '.join(sorted(lost))} to another process"
            log.error("stopping: %s; its acknowledgements are not recorded", reason)
            self._report.error, self._report.interrupted = reason, True

    def _take_back_unsent(self) -> None:
        """Changes marked uncertain whose request never started leave Gist as it was (fenced
        like acknowledgements: after a lost lease the new holder owns those rows)."""
        unsent, self._unsent = list(self._unsent.values()), {}
        if not unsent:
            return
        with self._engine.begin() as connection:
            if self._owner is not None:
                held = lease.renew(connection, {c.audience_key for c, _ in unsent}, self._owner)
                unsent = [(c, u) for c, u in unsent if c.audience_key in held]
            unmark_uncertain(connection, [c for c, _ in unsent], [u for _, u in unsent])
