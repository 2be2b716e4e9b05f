"""The pacer in simulated time: "never over the rate in any second" checked to the
millisecond, with no wall-clock waiting and no tolerances."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import re
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from audience_sync.config import GistConfig
from audience_sync.errors import RetriableApiError
from audience_sync.pacer import (
    FLEET_PACE_SHARE,
    PACE_SHARE,
    WINDOW_MARGIN,
    Pacer,
    allowed_lateness,
)


class VirtualClock:
    """``monotonic`` and ``sleep`` over simulated time: a sleeper wakes when every task that
    can run has run and no earlier sleeper is left."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._order), future))
        await future

    async def run(self, *coroutines: Coroutine[Any, Any, None]) -> None:
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        while not all(t.done() for t in tasks):
            for _ in range(20):  # let every runnable task reach its next sleep
                await asyncio.sleep(0)
            if self._sleepers:
                wake, _, future = heapq.heappop(self._sleepers)
                self.now = max(self.now, wake)
                future.set_result(None)
        for task in tasks:
            task.result()


def config(rate: float, **options: Any) -> GistConfig:
    return GistConfig(api_key=SecretStr("k"), requests_per_second=rate, **options)


def busiest_second(stamps: list[float]) -> int:
    """The most requests in any window [t, t + 1 s) — windows starting at every request."""
    ordered = sorted(stamps)
    return max(sum(1 for t in ordered[i:] if t < start + 1.0) for i, start in enumerate(ordered))


def pace(rate: float, requests: int, concurrency: int, fail_every: int = 0) -> list[float]:
    """Send ``requests`` through one pacer from ``concurrency`` workers; the simulated times
    at which each try reached "Gist"."""
    clock = VirtualClock()
    pacer = Pacer(
        config(rate, max_retries=3, retry_backoff_seconds=0.5),
        monotonic=clock.monotonic,
        sleep=clock.sleep,
    )
    stamps: list[float] = []
    numbers = itertools.count(1)

    async def worker(n: int) -> None:
        for _ in range(n):
            number, tries = next(numbers), itertools.count(1)

            async def request(number: int = number, tries: Iterator[int] = tries) -> int:
                stamps.append(clock.now)
                # The first try of every fail_every-th request is answered 429.
                if fail_every and number % fail_every == 0 and next(tries) == 1:
                    raise RetriableApiError("HTTP 429", status=429, retry_after=1.0)
                await clock.sleep(0.05)  # the answer takes 50 ms
                return 200

            await pacer.call(request)

    share, rest = divmod(requests, concurrency)
    workers = [worker(share + (1 if i < rest else 0)) for i in range(concurrency)]
    asyncio.run(clock.run(*workers))
    return stamps


@pytest.mark.parametrize(
    ("rate", "concurrency"),
    [(50, 8), (10, 32), (1, 4), (0.5, 2), (200, 64)],
    ids=["50/s-8", "10/s-32", "1/s", "every-2s", "200/s-64"],
)
def test_never_over_the_rate_in_any_second(rate: float, concurrency: int) -> None:
    requests = max(10, int(rate * 20))
    stamps = pace(rate, requests, concurrency)

    assert len(stamps) == requests
    assert busiest_second(stamps) <= max(1, int(rate))
    # ...and not far under it: at least the rate over the window the pacer keeps (2% longer
    # than the server's, against network jitter).
    elapsed = max(stamps) - min(stamps)
    assert (requests - 1) / elapsed >= rate / WINDOW_MARGIN * 0.995


def test_retries_take_slots_of_the_same_schedule() -> None:
    stamps = pace(20, 400, 16, fail_every=7)  # every 7th request: 429, Retry-After 1

    assert busiest_second(stamps) <= 20
    assert len(stamps) == 400 + 400 // 7  # the retries happened, within the same rate


def test_a_slot_left_unused_is_not_banked() -> None:
    clock = VirtualClock()
    pacer = Pacer(config(10), monotonic=clock.monotonic, sleep=clock.sleep)
    stamps: list[float] = []

    async def burst() -> None:
        await clock.sleep(5.0)  # idle for five seconds: fifty slots unused
        for _ in range(15):
            await pacer.take_slot()
            stamps.append(clock.now)

    asyncio.run(clock.run(burst()))

    assert busiest_second(stamps) <= 10


def test_a_request_counts_from_when_it_left_not_from_its_slot() -> None:
    """A request held back before it reaches the wire (a connection being opened, a busy
    loop) must not let the requests after it crowd into the server's second."""
    from audience_sync.gist import _ON_WIRE

    clock = VirtualClock()
    pacer = Pacer(config(50), monotonic=clock.monotonic, sleep=clock.sleep)
    on_wire: list[float] = []
    numbers = itertools.count()

    async def request() -> int:
        number = next(numbers)
        # The first few open connections and leave 40 ms late; the rest leave at once.
        await clock.sleep(0.04 if number < 8 else 0.0)
        callback = _ON_WIRE.get()
        assert callback is not None
        callback()
        on_wire.append(clock.now)
        await clock.sleep(0.002)
        return 200

    async def worker(n: int) -> None:
        for _ in range(n):
            await pacer.call(request)

    asyncio.run(clock.run(*(worker(25) for _ in range(8))))

    assert len(on_wire) == 200
    assert busiest_second(on_wire) <= 50


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(min_value=0.1, max_value=100_000),
    share=st.sampled_from([PACE_SHARE, FLEET_PACE_SHARE]),
)
def test_a_late_request_keeps_every_second_under_the_limit(rate: float, share: float) -> None:
    # Requests sent up to `late` after their slots: those in any one-second window had
    # their slots within 1 + late seconds, and however many processes share the schedule
    # (one slot per interval in all) that is never more than the limit.
    interval = 1 / (rate * share)
    late = allowed_lateness(interval, rate)
    assert late >= interval / 2
    slots_in_any_second = math.floor((1 + 2 * late) / interval) + 1
    assert slots_in_any_second <= max(math.floor(rate), 1) or late == interval / 2


def test_at_a_high_rate_a_wake_up_late_by_a_millisecond_keeps_its_slot() -> None:
    # Before: 0.05 ms at 10,000/s, so an event loop's ordinary wake-up gave up the slot.
    assert allowed_lateness(1 / (10_000 * PACE_SHARE), 10_000) > 0.002
    assert allowed_lateness(1 / (10_000 * FLEET_PACE_SHARE), 10_000) > 0.014
    assert allowed_lateness(1 / (50 * PACE_SHARE), 50) == pytest.approx(1 / (50 * PACE_SHARE) / 2)


def test_each_retry_is_logged_with_its_attempt_wait_and_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With -v, a Gist that could not be reached was 33 s of silence between two lines."""
    caplog.set_level(logging.INFO, "audience_sync.pacer")
    clock = VirtualClock()
    pacer = Pacer(
        config(100, max_retries=3, retry_backoff_seconds=0.5),
        monotonic=clock.monotonic,
        sleep=clock.sleep,
    )
    failures = iter(
        [
            RetriableApiError("cannot reach Gist at http://gist.test: connection refused"),
            RetriableApiError("HTTP 429: Too many requests", status=429, retry_after=7.0),
        ]
    )

    async def request() -> int:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return 200

    async def call() -> None:
        assert await pacer.call(request) == 200

    asyncio.run(clock.run(call()))
    lines = [r.getMessage() for r in caplog.records if r.name == "audience_sync.pacer"]
    assert len(lines) == 2, lines
    assert re.fullmatch(
        r"Gist request failed on attempt 1/4 \(cannot reach Gist at http://gist\.test: "
        r"connection refused\); retrying in (0\.[5-9]|1\.0)s",  # 0.5 s + up to 0.5 s of jitter
        lines[0],
    ), lines[0]
    assert lines[1] == (
        "Gist request failed on attempt 2/4 (HTTP 429: Too many requests); retrying in 7.0s"
    )
