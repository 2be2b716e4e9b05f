"""Schedules mean what crontab(5) means: weekdays, names, steps, the day rule and DST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


SPRING = (datetime(2026, 3, 28, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC))


def berlin_times(expression: str, span: tuple[datetime, datetime] = SPRING) -> list[str]:
    """Fire times as Berlin wall clock, ``DD HH:MM``."""
    return [f.astimezone(BERLIN).strftime("%d %H:%M") for f in fires(expression, *span, BERLIN.key)]


@pytest.mark.parametrize("minute", [0, 1, 15, 30, 45, 59])
def test_a_fixed_time_in_the_skipped_hour_runs_right_after_the_change(minute: int) -> None:
    """cron(5): a job whose time is skipped runs right after the change, at 03:00. Before,
    APScheduler moved it by the gap: `30 2` ran at 03:30 and `59 2` at 03:59."""
    assert berlin_times(f"{minute} 2 * * *") == [
        f"28 02:{minute:02d}",
        "29 03:00",  # 02:00 CET became 03:00 CEST
        f"30 02:{minute:02d}",
    ]


@pytest.mark.parametrize(
    ("expression", "on_the_29th"),
    [
        ("0,30 2 * * *", ["03:00"]),  # two skipped times: one run right after the change
        ("30 2,3 * * *", ["03:00", "03:30"]),  # the skipped one, then its own 03:30
        ("59 1,2 * * *", ["01:59", "03:00"]),
        ("0 3 * * *", ["03:00"]),  # 03:00 exists: nothing to catch up
        ("*/15 2 * * *", []),  # a wildcard job follows the clock: 02:xx never happens
        ("30 * * * *", ["00:30", "01:30", "03:30", "04:30"]),  # by the clock, hourly
    ],
    ids=[
        "two-skipped",
        "skipped-and-after",
        "before-and-skipped",
        "at-the-change",
        "wildcard-minute",
        "hourly",
    ],
)
def test_the_day_clocks_go_forward(expression: str, on_the_29th: list[str]) -> None:
    day = (datetime(2026, 3, 28, 23, tzinfo=UTC), datetime(2026, 3, 29, 3, tzinfo=UTC))
    assert [t.split()[1] for t in berlin_times(expression, day)] == on_the_29th


@pytest.mark.parametrize(
    ("expression", "on_the_25th"),
    [
        ("30 2 * * *", ["02:30+0200"]),  # a fixed time: the first pass only
        ("0,59 2 * * *", ["02:00+0200", "02:59+0200"]),
        ("*/30 2 * * *", ["02:00+0200", "02:30+0200", "02:00+0100", "02:30+0100"]),
    ],
    ids=["fixed", "fixed-list", "wildcard-both-passes"],
)
def test_the_day_clocks_go_back_keeps_its_rule(expression: str, on_the_25th: list[str]) -> None:
    day = (datetime(2026, 10, 24, 22, tzinfo=UTC), datetime(2026, 10, 25, 4, tzinfo=UTC))
    found = fires(expression, *day, BERLIN.key)
    assert [f.astimezone(BERLIN).strftime("%H:%M%z") for f in found] == on_the_25th


@pytest.mark.parametrize(
    ("zone", "expression", "span", "expected"),
    [
        # Lord Howe Island moves 30 minutes: 02:00 becomes 02:30.
        (
            "Australia/Lord_Howe",
            "15 2 * * *",
            (datetime(2026, 10, 3, tzinfo=UTC), 2),
            ["04 02:30+1100", "05 02:15+1100"],
        ),
        # Santiago skips midnight: 00:00 becomes 01:00.
        (
            "America/Santiago",
            "0 0 * * *",
            (datetime(2026, 9, 5, 12, tzinfo=UTC), 2),
            ["06 01:00-0300", "07 00:00-0300"],
        ),
        # ...and repeats 23:00-23:59 going back: a fixed time runs on the first pass only.
        (
            "America/Santiago",
            "30 23 * * *",
            (datetime(2026, 4, 4, 12, tzinfo=UTC), 2),
            ["04 23:30-0300", "05 23:30-0400"],
        ),
    ],
    ids=["half-hour-shift", "midnight-gap", "midnight-fold"],
)
def test_the_rule_holds_for_other_shifts(
    zone: str, expression: str, span: tuple[datetime, int], expected: list[str]
) -> None:
    start, days = span
    found = fires(expression, start, start + timedelta(days=days), zone)
    assert [f.astimezone(ZoneInfo(zone)).strftime("%d %H:%M%z") for f in found] == expected


def cron_at(expression: str, start: datetime, zone: str, limit: timedelta) -> datetime | None:
    """The first fire time at or after ``start`` as cron(5) decides it, minute by minute:
    a local time that happens and matches fires (a fixed time only on its first pass when
    clocks go back); the first minute after clocks went forward fires a fixed-time job
    whose time was skipped."""
    e = parse_crontab(expression)
    tz = ZoneInfo(zone)

    def matches(wall: datetime) -> bool:
        in_month, in_week = wall.day in e.days, (wall.weekday() + 1) % 7 in e.weekdays
        day = in_month and in_week if e.days_starred or e.weekdays_starred else in_month or in_week
        return day and wall.month in e.months and wall.hour in e.hours and wall.minute in e.minutes

    def offset(moment: datetime) -> timedelta:
        found = moment.utcoffset()
        assert found is not None
        return found

    moment = start
    while moment < start + limit:
        local = moment.astimezone(tz)
        before = (moment - timedelta(minutes=1)).astimezone(tz)
        repeat = offset(local.replace(fold=0)) != offset(local)  # the second pass
        if matches(local.replace(tzinfo=None)) and not (e.fixed_time and repeat):
            return moment
        if e.fixed_time and offset(local) > offset(before):  # clocks went forward
            skipped = local.replace(tzinfo=None) - (offset(local) - offset(before))
            while skipped < local.replace(tzinfo=None):
                if matches(skipped):
                    return moment
                skipped += timedelta(minutes=1)
        moment += timedelta(minutes=1)
    return None


def field(values: st.SearchStrategy[int], size: int) -> st.SearchStrategy[str]:
    listed = st.sets(values, min_size=1, max_size=size).map(lambda s: ",".join(map(str, sorted(s))))
    return st.one_of(st.just("*"), listed)


@settings(max_examples=150, deadline=None)
@given(
    minute=st.one_of(field(st.integers(0, 59), 3), st.sampled_from(["*/15", "*/20"])),
    hour=st.one_of(st.sets(st.integers(0, 4), min_size=1, max_size=3).map(
        lambda s: ",".join(map(str, sorted(s)))), st.just("*")),
    day=field(st.integers(1, 31), 3),
    weekday=field(st.integers(0, 7), 3),
    start=st.sampled_from(
        [datetime(2026, 3, 28, 22, tzinfo=UTC), datetime(2026, 10, 24, 21, tzinfo=UTC),
         datetime(2026, 6, 1, 8, tzinfo=UTC)]
    ),
    offset=st.integers(0, 8 * 60),
)  # fmt: skip
def test_fire_times_are_cron_s_minute_by_minute(
    minute: str, hour: str, day: str, weekday: str, start: datetime, offset: int
) -> None:
    expression = f"{minute} {hour} {day} * {weekday}"
    begin = start + timedelta(minutes=offset)
    limit = timedelta(days=40)
    expected = cron_at(expression, begin, "Europe/Berlin", limit)
    fire = cron_trigger(expression, BERLIN).get_next_fire_time(None, begin)
    assert fire is not None
    if expected is None:
        assert fire >= begin + limit
    else:
        assert fire.astimezone(UTC) == expected
