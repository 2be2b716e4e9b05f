"""Sending a run's plan to Gist: one request per user (or batch), bounded concurrency, every
request paced by the ``Pacer`` and fenced by the run's leases, and every outcome recorded in
the ledger."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from audience_sync import lease
from audience_sync.config import GistConfig
from audience_sync.errors import (
    AuthError,
    FailureKind,
    FatalApiError,
    FencedError,
    RetriableApiError,
    UnreachableError,
)
from audience_sync.gist import GistClient, guarded_by
from audience_sync.ledger import (
    ACK_SECONDS,
    AckBuffer,
    Change,
    Result,
    UserUpdate,
    mark_uncertain,
    save_results,
    unmark_uncertain,
)
from audience_sync.models import member_changes as changes
from audience_sync.pacer import Attempt, Pacer

log = logging.getLogger(__name__)

PAGE_ROWS = 2000  # pending changes read per page, ordered by user


@dataclass
class DeliveryReport:
    """How delivery ended: ``error`` is set when it stopped before sending everything."""

    requests: int = 0
    error: str | None = None
    failure: FailureKind | None = None  # the kind of ``error``
    interrupted: bool = False  # stopped on request (or a lost lease) rather than by a failure
    lost: dict[str, str] = field(default_factory=dict)  # keys whose lease was lost, and why


def iter_pages(engine: Engine, run_ids: Sequence[int]) -> Iterator[list[UserUpdate]]:
    """Pending changes of ``run_ids`` grouped by user, a page at a time (never all at once)."""
    after: str | None = None
    pending = (
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
    )
    while True:
        query = pending.limit(PAGE_ROWS)
        if after is not None:
            query = query.where(changes.c.user_id > after)
        with engine.connect() as connection:
            rows = connection.execute(query).all()
        if not rows:
            return
        full_page = len(rows) == PAGE_ROWS
        if full_page:
            last = rows[-1].user_id
            if rows[0].user_id != last:
                # The last user's changes may continue on the next page: leave them for it.
                rows = [r for r in rows if r.user_id != last]
            else:  # one user fills the page: all of theirs, however many, go together
                with engine.connect() as connection:
                    rows = connection.execute(pending.where(changes.c.user_id == last)).all()
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


class Deliverer:
    """Sends the pending updates of a set of runs and records every outcome.

    With a ``holder`` (the run's leases), every request is fenced on them (``lease.Holder``:
    it leaves only while its lease certainly outlasts it) and every save of outcomes renews
    them; a key whose lease is lost stops delivery, and nothing more of it is recorded.
    """

    def __init__(
        self,
        engine: Engine,
        client: GistClient,
        config: GistConfig,
        clock: Callable[[], datetime],
        should_stop: Callable[[], str | None] = lambda: None,
        on_result: Callable[[int], None] = lambda changes: None,
        *,
        holder: lease.Holder | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self._engine = engine
        self._client = client
        self._config = config
        self._clock = clock
        self._should_stop = should_stop
        self._on_result = on_result
        self._holder = holder
        self._pacer = pacer or Pacer(config)
        self._acks: AckBuffer[Result] = AckBuffer(self._save)
        self._report = DeliveryReport()
        self._crash: Exception | None = None
        # Raised in a sender and not an Exception (a callback's; KeyboardInterrupt and
        # SystemExit leave the event loop by themselves): run() stops at once and re-raises it.
        self._fatal: BaseException | None = None
        self._unsent: dict[int, tuple[Change, str]] = {}  # marked uncertain, not yet sent
        self._sending = 0  # batches in flight

    async def run(self, run_ids: Sequence[int]) -> DeliveryReport:
        """Deliver every pending change of ``run_ids``.

        Stops early, cancelling what is in flight, when Gist refuses the key or stays down;
        stops gracefully, letting in-flight requests finish and be recorded, when
        ``should_stop`` gives a reason (a signal) or a lease is lost (then nothing more of
        that audience is recorded, and no request of it leaves).
        """
        pages = iter_pages(self._engine, run_ids)

        def next_page() -> list[UserUpdate] | None:
            """The next page, marked uncertain (before any of it is sent)."""
            if (page := next(pages, None)) is not None:
                mark_uncertain(self._engine, page)
            return page

        # One sender per concurrency slot, each taking the next batch as soon as its last
        # one is answered (a task per batch left each freed connection idle for a turn of
        # the event loop); they take batches from a short queue this loop keeps full. A
        # batch still queued when delivery stops was never sent.
        queue: asyncio.Queue[list[UserUpdate] | None] = asyncio.Queue(self._config.max_concurrency)
        this = asyncio.current_task()
        assert this is not None
        senders = [
            asyncio.create_task(self._sender(queue, this))
            for _ in range(self._config.max_concurrency)
        ]
        # The state database is read and written from a worker thread, one page ahead: the
        # event loop only sends, so its pace stalls neither on a query nor between pages.
        # A page read ahead and never sent is taken back like any other unsent change.
        ahead: asyncio.Task[list[UserUpdate] | None] | None = None
        try:
            ahead = asyncio.create_task(asyncio.to_thread(next_page))
            while True:
                page = await ahead
                ahead = None
                if page is None:
                    break
                self._unsent.update((c.id, (c, u.user_id)) for u in page for c in u.changes)
                if self._report.error is not None:
                    break
                ahead = asyncio.create_task(asyncio.to_thread(next_page))
                size = self._config.batch_size
                for batch in (page[i : i + size] for i in range(0, len(page), size)):
                    if self._report.error is not None:
                        break
                    await self._acks.keep_up()
                    await queue.put(batch)
                    self._acks.flush_if_due()
            if self._report.error is not None and not self._report.interrupted:
                for sender in senders:  # Gist refuses the key or stays down: stop at once
                    sender.cancel()
            else:
                for _ in senders:
                    await queue.put(None)
                    self._acks.flush_if_due()
                # The last batches' answers are saved as they come, as the others were.
                while running := [sender for sender in senders if not sender.done()]:
                    await asyncio.wait(running, timeout=ACK_SECONDS)
                    self._acks.flush_if_due()
            await asyncio.gather(*senders, return_exceptions=True)
        except BaseException:
            # Our own failure (the state database, say): no request may outlive this method
            # and its HTTP client; what they would have acknowledged is simply sent again.
            # A page being read ahead may still be marked uncertain: that only makes the
            # next run plan its members from "Gist may hold either value".
            tasks: list[asyncio.Task[Any]] = [*senders, *([ahead] if ahead else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._acks.abandon()
            if self._fatal is not None:
                raise self._fatal from None
            raise
        await self._acks.flush()
        await asyncio.to_thread(self._take_back_unsent)
        if self._holder is not None:
            self._report.lost.update(self._holder.loss())
        if self._crash is not None:
            raise self._crash
        return self._report

    async def _sender(
        self, queue: asyncio.Queue[list[UserUpdate] | None], loop: asyncio.Task[Any]
    ) -> None:
        """Send the batches taken from ``queue`` one after another until it gives None.
        Before each, a stop (a signal, a lost lease) is noticed: from then on the batches
        taken are left unsent, and those in flight finish and are recorded. A
        ``BaseException`` that is no ``Exception`` cancels ``loop`` (``run``), which
        re-raises it: with its sender gone, the loop could wait for room in the queue for
        ever."""
        while (batch := await queue.get()) is not None:
            try:
                if self._report.error is None and (reason := self._stop_reason()):
                    log.warning("stopping: %s; letting %d finish", reason, self._sending)
                    self._interrupt(reason)
                if self._report.error is not None:
                    continue
                for update in batch:
                    for change in update.changes:
                        self._unsent.pop(change.id, None)
                self._sending += 1
                try:
                    await self._send(batch)
                finally:
                    self._sending -= 1
            except Exception as exc:  # a bug, not Gist: stop, and let run() re-raise it
                self._crash = self._crash or exc
                self._stop(f"internal error: {type(exc).__name__}: {exc}", "internal")
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                if self._fatal is None:  # once: a second cancel would cut run()'s cleanup
                    self._fatal = exc
                    loop.cancel()
                raise

    def _stop_reason(self) -> str | None:
        if reason := self._should_stop():
            return reason
        if self._holder is not None and (loss := self._holder.loss()):
            return "; ".join(loss.values())
        return None

    async def _send(self, batch: list[UserUpdate]) -> None:
        """Send one batch (one user when ``batch_size`` is 1)."""
        applied = False  # whether a batch request may have applied what is left to send
        if len(batch) > 1:
            batch, applied = await self._send_batch(batch)
        for update in batch:
            if self._report.error is not None and not self._report.interrupted:
                return
            await self._send_one(update, applied)

    def _guard(self, updates: Sequence[UserUpdate]) -> Callable[[], None]:
        """The fence for a request carrying ``updates``: their keys' leases."""
        holder = self._holder
        keys = {c.audience_key for u in updates for c in u.changes}
        if holder is None:
            return lambda: None
        return lambda: holder.check(keys)

    async def _send_batch(self, batch: list[UserUpdate]) -> tuple[list[UserUpdate], bool]:
        """``POST /contacts/batch``; returns the updates still to send one by one, and
        whether a try of the batch may have applied them (then a refusal of one of them
        alone does not show that Gist holds its old value).

        Contacts the batch's 2xx answer names as failed, and every contact of a batch answered
        otherwise (but for a refused key), are sent one by one, so each gets its own answer
        and one bad contact cannot hold back the others.
        """
        attempt = Attempt()
        try:
            with guarded_by(self._guard(batch)):
                answer = await self._pacer.call(
                    lambda: self._client.push_contacts(
                        [(u.user_id, u.email, u.properties) for u in batch]
                    ),
                    attempt,
                )
        except FencedError as exc:
            self._fenced(exc, batch)
            return [], True
        except AuthError as exc:
            self._stop(f"Gist refused the API key ({exc}); nothing more was sent", exc.failure)
            return [], True
        except UnreachableError as exc:
            self._stop(f"{exc}; nothing more was sent", exc.failure)
            return [], True
        except (FatalApiError, RetriableApiError) as exc:
            log.info("batch of %d refused (%s): sending one by one", len(batch), exc)
            # A 4xx to the only try applied nothing; after a retried try, or when Gist
            # stayed unavailable, any of them may have been applied.
            return batch, not (isinstance(exc, FatalApiError) and attempt.count == 1)
        finally:
            self._report.requests += attempt.count
        if answer.failed is None:
            log.info("batch answer names errors it does not attribute: sending one by one")
            return batch, True
        retry = [u for i, u in enumerate(batch) if i in answer.failed]
        for index, update in enumerate(batch):
            if index not in answer.failed:
                self._acks.add(Result(update, True, False, attempt.count, answer.status, None))
                self._on_result(len(update.changes))
        return retry, attempt.count > 1

    async def _send_one(self, update: UserUpdate, applied: bool = False) -> None:
        """``POST /contacts`` for one user. A refusal (4xx, a refused key, no way to Gist)
        shows that Gist holds the user's old value only when it answered the only request
        that carried the update: after a try whose answer was lost or a 5xx, or a batch
        that may have applied it (``applied``), the user stays uncertain."""
        attempt = Attempt()

        def refused() -> bool:
            return attempt.count == 1 and not applied

        try:
            with guarded_by(self._guard([update])):
                status = await self._pacer.call(
                    lambda: self._client.push_contact(
                        update.user_id, update.email, update.properties
                    ),
                    attempt,
                )
            self._acks.add(Result(update, True, False, attempt.count, status, None))
        except FencedError as exc:
            # Not sent (this try; an earlier try's answer may have been lost, which the
            # uncertainty marked before sending already covers).
            self._fenced(exc, [update])
        except AuthError as exc:
            # The key is refused: every later request would be too; this one was not applied.
            self._acks.add(Result(update, False, refused(), attempt.count, exc.status, str(exc)))
            self._stop(f"Gist refused the API key ({exc}); nothing more was sent", exc.failure)
        except UnreachableError as exc:
            # A wrong scheme or TLS set-up: no request gets through, so none is retried; this
            # one never reached Gist.
            self._acks.add(Result(update, False, refused(), attempt.count, None, str(exc)))
            self._stop(f"{exc}; nothing more was sent", exc.failure)
        except FatalApiError as exc:
            self._acks.add(Result(update, False, refused(), attempt.count, exc.status, str(exc)))
        except RetriableApiError as exc:
            # Still failing after every retry: Gist is down or overloaded. Stop; the next
            # run re-plans whatever was not acknowledged.
            self._acks.add(Result(update, False, False, attempt.count, exc.status, str(exc)))
            self._stop(f"Gist unavailable after {attempt.count} attempts: {exc}", exc.failure)
        except Exception as exc:
            # A bug or a broken database, not Gist: stop and let run() re-raise it.
            self._crash = exc
            self._stop(f"internal error: {type(exc).__name__}: {exc}", "internal")
        finally:
            self._report.requests += attempt.count
            self._on_result(len(update.changes))

    def _fenced(self, exc: FencedError, updates: Sequence[UserUpdate]) -> None:
        """A request the fence kept from leaving: stop, as after a lost lease. Its changes
        stay pending and their members uncertain (an earlier try of it may have reached
        Gist), so the next run plans them afresh."""
        self._report.lost.setdefault(exc.audience_key, exc.reason)
        if self._report.error is None:
            log.error("stopping: %s; nothing more is sent", exc.reason)
        self._interrupt(exc.reason)

    def _interrupt(self, reason: str) -> None:
        if self._report.error is None:
            self._report.error, self._report.interrupted = reason, True
            self._report.failure = "interrupted"

    def _stop(self, reason: str, failure: FailureKind) -> None:
        if self._report.error is None:
            # INFO: the reason becomes each run's error, which the CLI and daemon report.
            log.info(reason)
            self._report.error, self._report.failure = reason, failure

    def _save(self, results: list[Result]) -> None:
        lost = save_results(self._engine, results, self._clock(), self._holder)
        if lost and self._report.error is None:
            reason = "; ".join(self._holder.loss().values()) if self._holder else "lease lost"
            log.error("stopping: %s; its acknowledgements are not recorded", reason)
            self._interrupt(reason)

    def _take_back_unsent(self) -> None:
        """Changes marked uncertain whose request never started leave Gist as it was (fenced
        like acknowledgements: after a lost lease the new holder owns those rows)."""
        unsent, self._unsent = list(self._unsent.values()), {}
        if not unsent:
            return
        keys = {c.audience_key for c, _ in unsent}
        with lease.fenced(self._engine, self._holder, keys) as (connection, held):
            unsent = [(c, u) for c, u in unsent if c.audience_key in held]
            unmark_uncertain(connection, [c for c, _ in unsent], [u for _, u in unsent])
