"""Progress as log lines, for output that is not a terminal (the bars are in test_operations)."""

from __future__ import annotations

import logging

import pytest

from audience_sync.render import ProgressLog, duration_text


class Ticks:
    """A settable ``monotonic``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "audience_sync.render"]
    caplog.clear()
    return lines


def test_progress_lines_come_every_tenth_and_every_ten_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Piped or in a log file, a run said nothing between its start and its end."""
    caplog.set_level(logging.INFO, "audience_sync.render")
    clock = Ticks()
    progress = ProgressLog(monotonic=clock)

    progress.loaded("vip", 40_000)
    clock.now = 4
    progress.loaded("vip", 40_000)
    assert said(caplog) == []  # within ten seconds of the start: nothing to say yet
    clock.now = 10
    progress.loaded("vip", 20_000)
    assert said(caplog) == ["load vip: 100,000 rows read, 10,000/s"]

    clock.now = 20
    progress.planned(1_000)
    assert said(caplog) == ["send changes: 1,000 planned"]
    clock.now = 21
    progress.sent(50)
    assert said(caplog) == []
    clock.now = 22
    progress.sent(50)  # a tenth
    assert said(caplog) == ["send changes: 100 of 1,000 (10%), 50/s, about 18s left"]
    clock.now = 31
    progress.sent(10)
    assert said(caplog) == []
    clock.now = 32
    progress.sent(10)  # ten seconds since the last line, not yet another tenth
    assert said(caplog) == ["send changes: 120 of 1,000 (12%), 10/s, about 1m28s left"]
    clock.now = 33
    progress.sent(880)
    assert said(caplog) == ["send changes: 1,000 of 1,000 (100%), 77/s"]


def test_progress_is_said_at_info_so_only_verbose_logs_show_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    progress = ProgressLog()
    progress.planned(10)
    progress.sent(10)
    assert said(caplog) == []


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (45, "45s"), (185, "3m05s"), (7620, "2h07m")],
    ids=["nothing", "seconds", "minutes", "hours"],
)
def test_duration_text(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text
