"""The health rule as a pure function, and the heartbeat file."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from audience_sync.health import HeartbeatFile, Signs, assess

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
        ({"recent": TimeoutError()}, ["the state database cannot be reached: TimeoutError"]),
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
