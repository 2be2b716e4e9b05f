"""Sending a run's plan to Gist: one request per user, bounded concurrency, rate limit,
retries with back-off, and acknowledgements saved into ``memberships`` in batches."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, bindparam, delete, select
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from audience_sync.config import GistConfig
from audience_sync.db import upsert
from audience_sync.errors import AuthError, FatalApiError, RetriableApiError
from audience_sync.gist import GistClient
from audience_sync.models import member_changes as changes
from audience_sync.models import memberships, trait_values, uncertain_members

log = logging.getLogger(__name__)
T = TypeVar("T")

PAGE_ROWS = 2000  # pending changes read per page, ordered by user
ACK_BATCH = 200  # results saved per transaction, at most...
ACK_SECONDS = 1.0  # ...and at least this often
MAX_BACKOFF = 60.0
MAX_RETRY_AFTER = 600.0
PACE_SHARE = 0.995  # of requests_per_second actually used
WINDOW_MARGIN = 1.02


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
        # An entry carries the source's current email; an exit only the acknowledged one.
        entries = [c.email for c in self.changes if c.value]
        return entries[0] if entries else self.changes[0].email

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
    interrupted: bool = False  # stopped on request rather than by a failure


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
    the next runs then plan these members from "Gist may hold either value".
    """
    rows = [
        {"audience_key": c.audience_key, "user_id": u.user_id, "email": c.email, "run_id": c.run_id}
        for u in page
        for c in u.changes
    ]
    if rows:
        with engine.begin() as connection:
            connection.execute(upsert(engine, uncertain_members).on_conflict_do_nothing(), rows)


def save_results(engine: Engine, results: Sequence[Result], now: datetime) -> None:
    """Record results in one transaction: acknowledged changes move ``memberships``."""
    delivered = [r for r in results if r.delivered]
    entries = [
        {
            "audience_key": c.audience_key,
            "user_id": r.update.user_id,
            "email": c.email,
            "since": now,
            "last_run_id": c.run_id,
        }
        for r in delivered
        for c in r.update.changes
        if not c.is_trait and c.value
    ]
    exits = [
        {"k": c.audience_key, "u": r.update.user_id}
        for r in delivered
        for c in r.update.changes
        if not c.is_trait and not c.value
    ]
    values = [
        {
            "trait_key": c.audience_key,
            "user_id": r.update.user_id,
            "email": c.email,
            "value": c.value_json,
            "since": now,
            "last_run_id": c.run_id,
        }
        for r in delivered
        for c in r.update.changes
        if c.is_trait
    ]
    # An answer, yes or a definite no, makes Gist's value known again.
    settled = [
        {"k": c.audience_key, "u": r.update.user_id}
        for r in results
        if r.delivered or r.refused
        for c in r.update.changes
    ]
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
    with engine.begin() as connection:
        if entries:
            statement = upsert(engine, memberships)
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=[memberships.c.audience_key, memberships.c.user_id],
                    set_={
                        "email": statement.excluded.email,
                        "last_run_id": statement.excluded.last_run_id,
                    },
                ),
                entries,
            )
        if values:
            statement = upsert(engine, trait_values)
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=[trait_values.c.trait_key, trait_values.c.user_id],
                    set_={
                        "email": statement.excluded.email,
                        "value": statement.excluded.value,
                        "since": statement.excluded.since,
                        "last_run_id": statement.excluded.last_run_id,
                    },
                ),
                values,
            )
        for table, pairs in ((memberships, exits), (uncertain_members, settled)):
            if pairs:
                connection.execute(
                    delete(table).where(
                        table.c.audience_key == bindparam("k"), table.c.user_id == bindparam("u")
                    ),
                    pairs,
                )
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


@dataclass
class Attempt:
    """Counts the tries of one call, including the one that raised."""

    count: int = 0


class Pacer:
    """The rate limit and retry policy shared by everything that calls Gist.

    Every try, retries included, takes the next send slot of a fixed schedule, one per
    ``1 / requests_per_second`` seconds: a steady pace that never bursts and, unlike a
    leaky bucket woken by timers, does not drift below the rate. 429, 408, 5xx,
    timeouts and dropped connections are retried up to ``max_retries`` times, waiting
    what ``Retry-After`` says, else an exponential back-off with jitter.
    """

    def __init__(self, config: GistConfig) -> None:
        self._config = config
        # Just under the configured rate: a server whose own limit equals it must never see
        # one request too many in any second, whatever the network's jitter.
        rate = config.requests_per_second
        self._interval = 1 / (rate * PACE_SHARE)
        self._next_slot = 0.0
        # A sliding window as a server keeps one, slightly longer than a second so network
        # jitter cannot squeeze one request too many into the server's own window.
        self._window = WINDOW_MARGIN * max(1.0, 1 / rate)
        self._window_limit = max(1, int(rate * max(1.0, 1 / rate)))
        self._sent: deque[float] = deque()

    async def _take_slot(self) -> None:
        now = time.monotonic()
        # A slot left unused for a while is not banked: that would allow a burst.
        slot = max(now, self._next_slot)
        self._next_slot = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)
        # Tasks held up together (a busy event loop) would wake together: the window keeps
        # such a bunch from exceeding the rate over any second.
        while True:
            now = time.monotonic()
            while self._sent and self._sent[0] <= now - self._window:
                self._sent.popleft()
            if len(self._sent) < self._window_limit:
                break
            await asyncio.sleep(self._sent[0] + self._window - now)
        self._sent.append(now)

    async def call(self, request: Callable[[], Awaitable[T]], attempt: Attempt | None = None) -> T:
        """Await ``request()`` under the rate limit, retrying transient failures."""
        attempt = attempt or Attempt()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._config.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(RetriableApiError),
            reraise=True,
        )
        async for try_ in retrying:
            with try_:
                attempt.count = try_.retry_state.attempt_number
                await self._take_slot()
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
    ) -> None:
        self._engine = engine
        self._client = client
        self._config = config
        self._clock = clock
        self._should_stop = should_stop
        self._on_result = on_result
        self._pacer = Pacer(config)
        self._results: list[Result] = []
        self._report = DeliveryReport()
        self._crash: Exception | None = None
        self._next_flush = time.monotonic() + ACK_SECONDS

    async def run(self, run_ids: Sequence[int]) -> DeliveryReport:
        """Deliver every pending change of ``run_ids``.

        Stops early, cancelling what is in flight, when Gist refuses the key or stays down;
        stops gracefully, letting in-flight requests finish and be recorded, when
        ``should_stop`` gives a reason (a signal, a lost lease).
        """
        slots = asyncio.Semaphore(self._config.max_concurrency)
        in_flight: set[asyncio.Task[None]] = set()
        try:
            for page in iter_pages(self._engine, run_ids):
                if self._report.error is not None:
                    break
                mark_uncertain(self._engine, page)
                size = self._config.batch_size
                for batch in (page[i : i + size] for i in range(0, len(page), size)):
                    await slots.acquire()
                    if self._report.error is None and (reason := self._should_stop()):
                        log.warning("stopping: %s; letting %d finish", reason, len(in_flight))
                        self._report.error, self._report.interrupted = reason, True
                    if self._report.error is not None:
                        slots.release()
                        break
                    task = asyncio.create_task(self._send(batch, slots))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    # Acknowledgements are saved often: after a kill -9 only these are sent
                    # again.
                    if len(self._results) >= ACK_BATCH or time.monotonic() >= self._next_flush:
                        self._flush()
        except BaseException:
            # Our own failure (the state database, say): no request may outlive this method
            # and its HTTP client; what they would have acknowledged is simply sent again.
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            raise
        if self._report.error is not None and not self._report.interrupted:
            for task in in_flight:
                task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        self._flush()
        if self._crash is not None:
            raise self._crash
        return self._report

    async def _send(self, batch: list[UserUpdate], slots: asyncio.Semaphore) -> None:
        """Send one batch (one user when ``batch_size`` is 1), holding one slot."""
        try:
            if len(batch) > 1 and await self._send_batch(batch):
                return
            for update in batch:
                if self._report.error is not None and not self._report.interrupted:
                    return
                await self._send_one(update)
        finally:
            slots.release()

    async def _send_batch(self, batch: list[UserUpdate]) -> bool:
        """``POST /contacts/batch``; True when Gist acknowledged every contact in it.

        Any answer but a 2xx (or a refused key) falls back to single requests for the
        batch, so one bad contact cannot hold back the others.
        """
        attempt = Attempt()
        try:
            status = await self._pacer.call(
                lambda: self._client.push_contacts(
                    [(u.user_id, u.email, u.properties) for u in batch]
                ),
                attempt,
            )
        except AuthError as exc:
            self._stop(f"Gist refused the API key ({exc}); nothing more was sent")
            return True
        except (FatalApiError, RetriableApiError) as exc:
            log.info("batch of %d refused (%s): sending one by one", len(batch), exc)
            return False
        finally:
            self._report.requests += attempt.count
        for update in batch:
            self._results.append(Result(update, True, False, attempt.count, status, None))
            self._on_result(len(update.changes))
        return True

    async def _send_one(self, update: UserUpdate) -> None:
        attempt = Attempt()
        try:
            status = await self._pacer.call(
                lambda: self._client.push_contact(update.user_id, update.email, update.properties),
                attempt,
            )
            self._results.append(Result(update, True, False, attempt.count, status, None))
        except AuthError as exc:
            # The key is refused: every later request would be too. Nothing here is acked.
            self._stop(f"Gist refused the API key ({exc}); nothing more was sent")
        except FatalApiError as exc:
            self._results.append(Result(update, False, True, attempt.count, exc.status, str(exc)))
        except RetriableApiError as exc:
            # Still failing after every retry: Gist is down or overloaded. Stop; the next
            # run re-plans whatever was not acknowledged.
            self._results.append(Result(update, False, False, attempt.count, exc.status, str(exc)))
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
            log.error(reason)
            self._report.error = reason

    def _flush(self) -> None:
        self._next_flush = time.monotonic() + ACK_SECONDS
        results, self._results = self._results, []
        if results:
            save_results(self._engine, results, self._clock())
