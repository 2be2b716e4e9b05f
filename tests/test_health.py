"""The health rule as a pure function, the heartbeat file, and the state database watch."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from audience_sync.health import HeartbeatFile, Signs, StateWatch, assess

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def signs(**changes: object) -> Signs:
    base: dict[str, object] = {
        "now": NOW,
        "tick_at": NOW - timedelta(seconds=30),
        "progress_at": None,
        "running": [],
        "keys": ["a", "b"],
        "recent": {"a": ["succeeded"], "b": ["failed", "failed", "failed"]},
    }
    return Signs(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "reasons"),
    [
        ({}, []),
        ({"tick_at": NOW - timedelta(seconds=901)}, ["the scheduler loop has not ticked for 901s"]),
        ({"tick_at": None}, []),
        ({"progress_at": NOW - timedelta(seconds=900)}, []),
        (
            {"progress_at": NOW - timedelta(seconds=1200), "running": ["a"]},
            ["the scheduler thread has made no progress for 1200s (syncing a)"],
        ),
        ({"recent": "TimeoutError"}, ["the state database cannot be reached: TimeoutError"]),
        (
            {"unanswered_since": NOW - timedelta(seconds=11)},
            ["the state database has not answered for 11s"],
        ),
        ({"unanswered_since": NOW - timedelta(seconds=10)}, []),
        (
            {"recent": "OSError", "unanswered_since": NOW - timedelta(seconds=12)},
            ["the state database has not answered for 12s"],
        ),
        (
            {"recent": {"a": ["partial"] * 3, "b": ["guarded", "failed", "interrupted"]}},
            ["the last 3 runs of every audience failed"],
        ),
        ({"recent": {"a": ["failed"] * 2, "b": ["failed"] * 3}}, []),
        ({"recent": {}, "keys": []}, []),
        ({"recent": None}, []),
    ],
    ids=[
        "healthy",
        "loop-stalled",
        "not-serving",
        "long-sync-at-the-bound",
        "sync-stalled",
        "database-down",
        "database-silent",
        "database-slow-within-patience",
        "database-silent-after-an-error",
        "all-failing",
        "too-few-runs-to-tell",
        "nothing-scheduled",
        "not-asked",
    ],
)
def test_assess(given: dict[str, object], reasons: list[str]) -> None:
    healthy, info = assess(signs(**given), stall_seconds=900, failed_runs=3)
    assert healthy == (not reasons)
    assert info.get("reasons", []) == reasons
    assert info["status"] == ("unhealthy" if reasons else "ok")


def test_heartbeat_file_is_replaced_whole_and_moves(tmp_path: Path) -> None:
    beat = HeartbeatFile(tmp_path / "a.json")
    beat.write({"n": 1})
    beat.write({"n": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"n": 2}
    beat.move_to(tmp_path / "b.json")
    beat.write({"n": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]
    beat.move_to(None)
    beat.write({"n": 4})
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_heartbeat_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    HeartbeatFile(tmp_path / "missing" / "beat.json").write({"n": 1})
    assert "cannot write heartbeat file" in caplog.text


def test_the_state_watch_says_an_outage_once_and_its_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "audience_sync.health")
    answer = threading.Event()
    failing = threading.Event()
    reads: list[float] = []

    def read() -> dict[str, list[str]]:
        reads.append(time.monotonic())
        if len(reads) == 1:
            answer.wait(WAIT)  # the first check hangs (a partition)
        if failing.is_set():
            raise OSError("connection refused")
        return {}

    watch = StateWatch(read, lambda: NOW, lambda exc: f"{type(exc).__name__}: {exc}")
    stop = threading.Event()
    watching = threading.Thread(target=watch.watch, args=(stop,), kwargs=FAST)
    watching.start()
    try:
        wait_until(lambda: "has not answered" in caplog.text)
        time.sleep(0.3)
        assert len(reads) == 1  # no second check piles up behind the one that waits
        assert watch.seen() == (None, NOW)
        answer.set()
        wait_until(lambda: "answers again" in caplog.text)
        assert watch.seen() == ({}, None)
        failing.set()
        wait_until(lambda: "cannot be reached" in caplog.text)
        count = len(reads)
        wait_until(lambda: len(reads) > count + 3)  # checks go on, and are not said again
    finally:
        answer.set()
        stop.set()
        watching.join(WAIT)
    assert not watching.is_alive()
    assert caplog.messages == [
        "the state database has not answered for 0.2s (a network partition, or a database "
        "that hangs); /healthz answers 503 until it does",
        "the state database answers again",
        "the state database cannot be reached (OSError: connection refused); /healthz answers 503",
    ]
    assert watch.seen() == ("OSError: connection refused", None)


WAIT = 5.0
FAST = {"every": 0.02, "patience": 0.2}


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)
