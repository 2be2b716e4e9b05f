"""The pace of every request to Gist: one send slot per interval (shared by every process of a
workspace through ``budget``), and retries with back-off that honour ``Retry-After``."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from audience_sync.budget import Block, SharedBudget, block_slots
from audience_sync.config import GistConfig
from audience_sync.errors import RetriableApiError
from audience_sync.gist import on_wire

log = logging.getLogger(__name__)
T = TypeVar("T")

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
            before_sleep=self._say_retry,
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

    def _say_retry(self, state: RetryCallState) -> None:
        """One line per retry (shown with -v): which try failed, why, and how long it waits,
        so a Gist that cannot be reached is never a silent half-minute."""
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info(
            "Gist request failed on attempt %d/%d (%s); retrying in %.1fs",
            state.attempt_number, self._config.max_retries + 1, error, wait,
        )  # fmt: skip

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RetriableApiError) and error.retry_after is not None:
            return min(error.retry_after, MAX_RETRY_AFTER)
        # Exponential back-off with full-size jitter, so retrying workers do not move in step.
        base = self._config.retry_backoff_seconds
        backoff: float = min(MAX_BACKOFF, base * 2 ** (state.attempt_number - 1))
        return backoff + random.uniform(0, base)
