"""crontab(5) expressions parsed into explicit value sets (no scheduler imported).

APScheduler 3's ``CronTrigger.from_crontab`` counts weekday 0 as Monday and ANDs the day
fields; cron counts 0 (and 7) as Sunday and fires when *either* day field matches once both
are restricted. So the five fields are parsed here, by crontab(5)'s rules, into explicit
value sets; ``cron`` builds the trigger from them. Config validation imports only this half.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass

__all__ = ["CronExpression", "parse_crontab"]

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
