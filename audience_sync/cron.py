"""crontab(5) expressions → APScheduler triggers that fire when cron would.

The expression is parsed by ``crontab`` (which config validation imports without APScheduler);
the trigger here walks the parsed value sets.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any

from apscheduler.triggers.base import BaseTrigger

from audience_sync.crontab import CronExpression, parse_crontab

__all__ = ["CronExpression", "CronSchedule", "cron_trigger", "parse_crontab"]

# Days a next fire time is looked for: a 29 February that is a Monday (`0 0 29 2 mon` is
# either; `0 0 */30 2 mon` both) recurs within 28 years.
SEARCH_DAYS = 28 * 366
# More than any daylight-saving shift: a wall time this much before another cannot happen
# after it.
MAX_SHIFT = timedelta(hours=3)


class CronSchedule(BaseTrigger):  # type: ignore[misc]  # APScheduler ships no type hints
    """An APScheduler trigger that fires when cron would, in ``timezone``.

    Daylight saving follows crontab(5): a job at a fixed time (neither minute nor hour
    starts with ``*``) runs once when clocks go back (the repeated hour is skipped the
    second time) and, when clocks go forward over its time, right after the change (at
    the first minute that exists: 03:00 for 02:30 when 02:00 becomes 03:00). Jobs with
    ``*`` in the minute or hour run by the clock as it is: a time that never happens does
    not run, and a repeated one runs each time it happens.

    Fire times are found by walking local dates and times, not from APScheduler's
    ``CronTrigger``: that one moves a time that never happens by the size of the gap
    (02:30 to 03:30), so a job anywhere in the skipped hour ran late, and not together.
    """

    def __init__(self, expression: CronExpression, timezone: tzinfo) -> None:
        self.expression = expression
        self.timezone = timezone
        self._times = [
            time(hour, minute)
            for hour in sorted(expression.hours)
            for minute in sorted(expression.minutes)
        ]

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The first fire time after ``previous_fire_time`` (or from ``now`` when None)."""
        if previous_fire_time is not None:
            after = previous_fire_time.astimezone(UTC)
        else:  # "from now" includes now itself, to the second
            after = now.astimezone(UTC).replace(microsecond=0) - timedelta(microseconds=1)
        # The local day before too: a fold at midnight puts its second pass after `after`.
        day = (after.astimezone(self.timezone) - timedelta(days=1)).date()
        for _ in range(SEARCH_DAYS):
            found = self._first_on(day, after)
            if found is not None:
                return found.astimezone(self.timezone)
            day += timedelta(days=1)
        return None

    def _first_on(self, day: date, after: datetime) -> datetime | None:
        """The earliest fire time (UTC) on local date ``day`` that is later than ``after``."""
        if not self._runs_on(day):
            return None
        floor = after.astimezone(self.timezone).replace(tzinfo=None) - MAX_SHIFT
        best: datetime | None = None
        for moment in self._times:
            wall = datetime.combine(day, moment)
            if wall < floor:
                continue  # long before `after`, whatever the offsets
            if (
                best is not None
                and wall > best.astimezone(self.timezone).replace(tzinfo=None) + MAX_SHIFT
            ):
                break  # later times of the day cannot come first
            for instant in self._instants(wall):
                if instant > after and (best is None or instant < best):
                    best = instant
        return best

    def _runs_on(self, day: date) -> bool:
        e = self.expression
        if day.month not in e.months:
            return False
        in_month, in_week = day.day in e.days, (day.weekday() + 1) % 7 in e.weekdays
        if e.days_starred or e.weekdays_starred:
            return in_month and in_week
        return in_month or in_week  # both restricted: either one matching fires

    def _instants(self, wall: datetime) -> list[datetime]:
        """When local time ``wall`` happens, in UTC: once; twice in a repeated hour (a fixed
        time only the first); never in a skipped hour (a fixed time right after the change)."""
        first = wall.replace(tzinfo=self.timezone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.timezone, fold=1).astimezone(UTC)
        if first == second:
            return [first]
        if first < second:  # clocks went back: the wall time happens twice
            return [first] if self.expression.fixed_time else [first, second]
        # Clocks went forward over it (fold=0 reads it with the offset before the change).
        return [_change_between(second, first, self.timezone)] if self.expression.fixed_time else []

    def __str__(self) -> str:
        return f"cron[{self.expression.text}]"

    def __repr__(self) -> str:
        return f"<CronSchedule ({self.expression.text!r}, timezone='{self.timezone}')>"

    def __eq__(self, other: Any) -> bool:
        return (
            isinstance(other, CronSchedule)
            and other.expression == self.expression
            and str(other.timezone) == str(self.timezone)
        )

    def __hash__(self) -> int:
        return hash((self.expression, str(self.timezone)))


def _change_between(low: datetime, high: datetime, timezone: tzinfo) -> datetime:
    """The instant (UTC, a whole second) in ``(low, high]`` at which ``timezone``'s offset
    changes: the first one that exists after a skipped wall time."""
    before = low.astimezone(timezone).utcoffset()
    lo, hi = math.floor(low.timestamp()), math.ceil(high.timestamp())
    while hi - lo > 1:
        middle = (lo + hi) // 2
        if datetime.fromtimestamp(middle, timezone).utcoffset() == before:
            lo = middle
        else:
            hi = middle
    return datetime.fromtimestamp(hi, UTC)


def cron_trigger(text: str, timezone: tzinfo) -> CronSchedule:
    """The trigger for crontab expression ``text`` in ``timezone``."""
    return CronSchedule(parse_crontab(text), timezone)
