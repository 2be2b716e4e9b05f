"""Schedules mean what crontab(5) means: weekdays, names, steps, the day rule and DST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from audience_sync.cron import cron_trigger, parse_crontab

BERLIN = ZoneInfo("Europe/Berlin")
MONDAY = datetime(2024, 4, 29, tzinfo=UTC)  # 29 April 2024 was a Monday


def fires(expression: str, start: datetime, end: datetime, tz: str = "UTC") -> list[datetime]:
    """Every fire time of ``expression`` in [start, end), in UTC, as the scheduler walks them."""
    trigger = cron_trigger(expression, ZoneInfo(tz))
    found: list[datetime] = []
    previous = None
    now = start
    while True:
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None or fire >= end:
            return found
        found.append(fire.astimezone(UTC))
        previous = now = fire


def weekdays(expression: str, weeks: int = 2) -> list[str]:
    """The weekday names on which ``expression`` fires over ``weeks`` weeks from a Monday."""
    start = MONDAY
    return [f.strftime("%a") for f in fires(expression, start, start + timedelta(weeks=weeks))]


@pytest.mark.parametrize(
    ("expression", "days"),
    [
        ("0 9 * * 1-5", ["Mon", "Tue", "Wed", "Thu", "Fri"]),
        ("0 9 * * 0", ["Sun"]),
        ("0 9 * * 7", ["Sun"]),
        ("0 9 * * sun", ["Sun"]),
        ("0 9 * * SUN", ["Sun"]),
        ("0 9 * * 6,0", ["Sat", "Sun"]),
        ("0 9 * * 6-7", ["Sat", "Sun"]),
        ("0 9 * * 5-7", ["Fri", "Sat", "Sun"]),
        ("0 9 * * mon-fri", ["Mon", "Tue", "Wed", "Thu", "Fri"]),
        ("0 9 * * 1", ["Mon"]),
        ("0 9 * * */2", ["Tue", "Thu", "Sat", "Sun"]),
        ("0 9 * * 1-5/2", ["Mon", "Wed", "Fri"]),
        ("0 9 * * 0-6", ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]),
        ("0 9 * * tue,thu", ["Tue", "Thu"]),
    ],
    ids=[
        "weekdays-numeric",
        "zero-is-sunday",
        "seven-is-sunday",
        "name",
        "name-any-case",
        "list",
        "range-to-seven",
        "fri-to-sun",
        "name-range",
        "one-is-monday",
        "step-from-sunday",
        "range-step",
        "whole-week",
        "name-list",
    ],
)
def test_day_of_week_counts_like_cron(expression: str, days: list[str]) -> None:
    assert weekdays(expression, weeks=1) == days
    assert weekdays(expression, weeks=2) == days * 2


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # crontab(5): "1,15 * 5" fires on the 1st, the 15th and every Friday.
    start = datetime(2024, 5, 1, tzinfo=UTC)
    found = fires("0 0 1,15 * 5", start, datetime(2024, 6, 1, tzinfo=UTC))
    assert [f.day for f in found] == [1, 3, 10, 15, 17, 24, 31]


def test_a_starred_day_field_keeps_the_and_rule() -> None:
    # A field that starts with "*" (even "*/2") is not a restriction in cron's sense.
    start = datetime(2024, 5, 1, tzinfo=UTC)
    found = fires("0 0 */2 * 5", start, datetime(2024, 6, 1, tzinfo=UTC))
    assert [f.day for f in found] == [3, 17, 31]  # odd days that are Fridays


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("*/15 * * * *", [0, 15, 30, 45]),
        ("5-20/5 * * * *", [5, 10, 15, 20]),
        ("1,2,59 * * * *", [1, 2, 59]),
        ("0 * * * *", [0]),
    ],
    ids=["step", "range-step", "list", "hourly"],
)
def test_minutes(expression: str, expected: list[int]) -> None:
    start = datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert [f.minute for f in fires(expression, start, start + timedelta(hours=1))] == expected


def test_month_names_and_macros() -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    end = datetime(2025, 1, 1, tzinfo=UTC)
    assert [f.month for f in fires("0 0 1 jan,jul *", start, end)] == [1, 7]
    assert len(fires("@daily", start, start + timedelta(days=3))) == 3
    assert [f.strftime("%a") for f in fires("@weekly", start, start + timedelta(weeks=2))] == [
        "Sun",
        "Sun",
    ]
    assert len(fires("@hourly", start, start + timedelta(hours=5))) == 5
    assert [(f.month, f.day) for f in fires("@monthly", start, datetime(2024, 4, 1, tzinfo=UTC))]
    assert fires("@yearly", start, end) == [start]


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("0 9 * *", "5 fields"),
        ("0 9 * * * *", "5 fields"),
        ("60 * * * *", "minute: 60 is out of range 0-59"),
        ("0 24 * * *", "hour: 24 is out of range 0-23"),
        ("0 0 0 * *", "day of month: 0 is out of range 1-31"),
        ("0 0 * 13 *", "month: 13 is out of range 1-12"),
        ("0 0 * * 8", "day of week: 8 is out of range 0-7"),
        ("0 0 * * fri-mon", "day of week: range fri-mon runs backwards"),
        ("*/0 * * * *", "minute: step 0"),
        ("0 0 * * funday", "day of week: 'funday' is not a number or name"),
        ("5/10 * * * *", "minute: '5/10'"),
        ("0 0 31 2 *", "never fires"),
        ("@reboot", "@reboot"),
        ("0 0 1st * *", "day of month: '1st'"),
        ("0 0 L * *", "day of month: 'L'"),
        ("1,,2 * * * *", "minute: ''"),
    ],
    ids=[
        "four-fields",
        "six-fields",
        "minute-range",
        "hour-range",
        "day-zero",
        "month-13",
        "weekday-8",
        "backwards",
        "zero-step",
        "bad-name",
        "number-step",
        "feb-31",
        "reboot",
        "apscheduler-extension",
        "quartz-extension",
        "empty-item",
    ],
)
def test_invalid_expressions_are_refused_with_the_field_named(
    expression: str, fragment: str
) -> None:
    with pytest.raises(ValueError, match=r".*") as info:
        parse_crontab(expression)
    assert fragment in str(info.value)


def daily_two_am_berlin(start: datetime, end: datetime) -> list[datetime]:
    return fires("0 2 * * *", start, end, "Europe/Berlin")


def test_clocks_going_back_fire_a_daily_job_once() -> None:
    # 2026-10-25 03:00 CEST becomes 02:00 CET: 02:00 local happens twice.
    found = daily_two_am_berlin(
        datetime(2026, 10, 23, 12, tzinfo=UTC), datetime(2026, 10, 28, tzinfo=UTC)
    )
    assert [f.isoformat() for f in found] == [
        "2026-10-24T00:00:00+00:00",
        "2026-10-25T00:00:00+00:00",  # the first 02:00 (CEST); not again at 01:00 UTC
        "2026-10-26T01:00:00+00:00",
        "2026-10-27T01:00:00+00:00",
    ]


def test_clocks_going_forward_fire_a_daily_job_once() -> None:
    # 2026-03-29 02:00 CET becomes 03:00 CEST: 02:00 local never happens; cron runs it
    # at once after the change, as crontab(5)'s daylight-saving rule says.
    found = daily_two_am_berlin(
        datetime(2026, 3, 27, 12, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    )
    assert [f.isoformat() for f in found] == [
        "2026-03-28T01:00:00+00:00",
        "2026-03-29T01:00:00+00:00",  # 03:00 CEST, right after the change
        "2026-03-30T00:00:00+00:00",
        "2026-03-31T00:00:00+00:00",
    ]
    assert [f.astimezone(BERLIN).day for f in found] == [28, 29, 30, 31]


def test_hourly_jobs_keep_their_pace_through_the_repeated_hour() -> None:
    # Wildcard-hour jobs run by the clock as it is, so the repeated hour is not a gap.
    start = datetime(2026, 10, 24, 22, tzinfo=UTC)
    found = fires("30 * * * *", start, start + timedelta(hours=6), "Europe/Berlin")
    assert len(found) == 6
    assert all(b - a == timedelta(hours=1) for a, b in pairwise(found))


def test_fixed_time_jobs_inside_the_repeated_hour_run_once_each() -> None:
    start = datetime(2026, 10, 24, 22, tzinfo=UTC)
    found = fires("0,30 2 * * *", start, start + timedelta(hours=6), "Europe/Berlin")
    assert [f.strftime("%H:%M") for f in found] == ["00:00", "00:30"]  # CEST 02:00, 02:30
