"""crontab(5) expressions → APScheduler triggers that fire when cron would.

APScheduler 3's ``CronTrigger.from_crontab`` counts weekday 0 as Monday and ANDs the day
fields; cron counts 0 (and 7) as Sunday and fires when *either* day field matches once both
are restricted. So the five fields are parsed here, by crontab(5)'s rules, into explicit
value sets, and the trigger is built from those sets (weekdays by name).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

__all__ = ["CronExpression", "CronSchedule", "cron_trigger", "parse_crontab"]

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {name.lower(): n for n, name in enumerate(calendar.month_abbr) if name}
_WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_APS_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # by cron number


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]


_FIELDS = (
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day of month", 1, 31, {}),
    _Field("month", 1, 12, _MONTHS),
    _Field("day of week", 0, 7, _WEEKDAYS),
)


@dataclass(frozen=True)
class CronExpression:
    """A parsed crontab line: the values each field allows (weekdays 0-6, 0 = Sunday)."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_starred: bool  # the day-of-month field starts with "*"
    weekdays_starred: bool  # the day-of-week field starts with "*"
    fixed_time: bool  # neither minute nor hour starts with "*" (cron's DST rule)


def parse_crontab(text: str) -> CronExpression:
    """Parse a 5-field crontab expression (or an ``@daily``-style macro) as crontab(5) does.

    Raises ``ValueError`` naming the field at fault.
    """
    expanded = text.strip()
    if expanded.startswith("@"):
        if expanded.lower() not in MACROS:
            known = ", ".join(MACROS)
            raise ValueError(f"{expanded} is not supported (use one of {known})")
        expanded = MACROS[expanded.lower()]
    parts = expanded.split()
    if len(parts) != 5:
        raise ValueError(
            f"needs 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}"
        )
    values = [_parse_field(part, field) for part, field in zip(parts, _FIELDS, strict=True)]
    minutes, hours, days, months, weekdays = values
    weekdays = frozenset(d % 7 for d in weekdays)  # 7 is Sunday too
    days_starred, weekdays_starred = parts[2].startswith("*"), parts[4].startswith("*")
    longest = max(29 if m == 2 else calendar.monthrange(2001, m)[1] for m in months)
    if weekdays_starred and min(days) > longest:  # the day of month alone decides
        raise ValueError(f"day of month {min(days)} never occurs in the months given: never fires")
    return CronExpression(
        text=text.strip(),
        minutes=minutes,
        hours=hours,
        days=days,
        months=months,
        weekdays=weekdays,
        days_starred=days_starred,
        weekdays_starred=weekdays_starred,
        fixed_time=not (parts[0].startswith("*") or parts[1].startswith("*")),
    )


def _parse_field(text: str, field: _Field) -> frozenset[int]:
    allowed: set[int] = set()
    for item in text.split(","):
        allowed |= _parse_item(item, field)
    return frozenset(allowed)


def _parse_item(item: str, field: _Field) -> set[int]:
    where = field.name
    body, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not step_text.isdigit():
            raise ValueError(f"{where}: step {step_text!r} in {item!r} is not a number")
        step = int(step_text)
        if step == 0:
            raise ValueError(f"{where}: step 0 in {item!r} never advances")
    if body == "*":
        low, high = field.low, field.high
    else:
        first, dash, last = body.partition("-")
        low = _value(first, field, item)
        high = _value(last, field, item) if dash else low
        if slash and not dash:
            # cron accepts a step after "*" or a range only ("5/10" is not crontab(5)).
            raise ValueError(f"{where}: {item!r} needs a range or * before the step")
        if high < low:
            raise ValueError(f"{where}: range {body} runs backwards")
    return set(range(low, high + 1, step))


def _value(text: str, field: _Field, item: str) -> int:
    if text.isdigit():
        number = int(text)
    elif text.lower() in field.names:
        number = field.names[text.lower()]
    else:
        raise ValueError(f"{field.name}: {text!r} is not a number or name (in {item!r})")
    if not field.low <= number <= field.high:
        raise ValueError(f"{field.name}: {number} is out of range {field.low}-{field.high}")
    return number


class CronSchedule(BaseTrigger):  # type: ignore[misc]  # APScheduler ships no type hints
    """An APScheduler trigger that fires when cron would, in ``timezone``.

    Daylight saving follows crontab(5): a job at a fixed time (neither minute nor hour
    starts with ``*``) runs once when clocks go back (the repeated hour is skipped the
    second time) and once, right after the change, when its time is skipped going forward.
    Jobs with ``*`` in the minute or hour run by the clock as it is.
    """

    def __init__(self, expression: CronExpression, timezone: tzinfo) -> None:
        self.expression = expression
        self.timezone = timezone
        e = expression

        def build(days: str, weekdays: str) -> CronTrigger:
            return CronTrigger(
                month=_list(e.months, 1, 12),
                day=days,
                day_of_week=weekdays,
                hour=_list(e.hours, 0, 23),
                minute=_list(e.minutes, 0, 59),
                second="0",
                timezone=timezone,
            )

        days = _list(e.days, 1, 31)
        weekdays = (
            "*" if len(e.weekdays) == 7 else ",".join(_APS_WEEKDAYS[d] for d in sorted(e.weekdays))
        )
        if e.days_starred or e.weekdays_starred:
            self._triggers = [build(days, weekdays)]
        else:  # both restricted: either one matching fires
            self._triggers = [build(days, "*"), build("*", weekdays)]

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The first fire time after ``previous_fire_time`` (or from ``now`` when None)."""
        fire = self._next(previous_fire_time, now)
        while fire is not None and self.expression.fixed_time and _is_repeat(fire):
            fire = self._next(fire, fire)
        return fire

    def _next(self, previous: datetime | None, now: datetime) -> datetime | None:
        # APScheduler 3 can answer `previous` itself when it is given in another zone
        # inside a repeated hour; in the trigger's own zone, and checked, it cannot.
        if previous is not None:
            previous = previous.astimezone(self.timezone)
        now = now.astimezone(self.timezone)
        found = []
        for trigger in self._triggers:
            fire = trigger.get_next_fire_time(previous, now)
            if fire is not None and previous is not None and fire <= previous:
                fire = trigger.get_next_fire_time(None, previous + timedelta(seconds=1))
            if fire is not None:
                found.append(fire)
        return min(found) if found else None

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


def cron_trigger(text: str, timezone: tzinfo) -> CronSchedule:
    """The trigger for crontab expression ``text`` in ``timezone``."""
    return CronSchedule(parse_crontab(text), timezone)


def _list(values: frozenset[int], low: int, high: int) -> str:
    if values == frozenset(range(low, high + 1)):
        return "*"
    return ",".join(str(v) for v in sorted(values))


def _is_repeat(moment: datetime) -> bool:
    """Whether ``moment`` is the second pass of a wall-clock time repeated when clocks go back."""
    return moment.fold == 1 and moment.replace(fold=0).utcoffset() != moment.utcoffset()
