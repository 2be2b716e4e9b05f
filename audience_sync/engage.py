"""Segment Engage exports (JSONL identify/track payloads) rebuilt into one computation's state."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from audience_sync.errors import SourceError
from audience_sync.rows import CHUNK_SIZE, WHITE_SPACE, SourceRow, canonical_user_id

_ENTERED, _EXITED, _COMPUTED = "Audience Entered", "Audience Exited", "Trait Computed"
_TIME_FIELDS = ("timestamp", "sentAt", "receivedAt")
_MISSING = object()
_MEMBERSHIP_BY_EVENT: dict[Any, bool] = {_ENTERED: True, _EXITED: False}

# (time, line number): what "later" means between two events, a total order. An event's time
# is its own timestamp, or without one the time of the nearest earlier line that has one.
_Order = tuple[datetime, int]
_BEGINNING = datetime.min.replace(tzinfo=UTC)


def read_engage(
    path: Path,
    computation_key: str,
    *,
    kind: Literal["audience", "trait"],
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[list[SourceRow]]:
    """Yield the current state of one Engage audience or computed trait, in chunks.

    Each line of ``path`` is one Segment identify or track payload, oldest first. Only events
    whose ``context.personas.computation_key`` (else ``properties.audience_key``/``trait_key``)
    is ``computation_key`` and whose class is ``kind`` count; everything else is skipped.
    The latest event per user decides, in one total order: events are ordered by time, then
    by line. An event's time is its ``timestamp`` (else ``sentAt``, else ``receivedAt``); an
    event without one takes the time of the nearest earlier line that has one (the start of
    time for lines before any), so it counts as happening just after that line. ``userId``s
    are canonical (``42``, ``42.0`` and ``"42"`` are one user):

    - ``kind="audience"``: one ``(line, userId, email, None)`` per current member;
    - ``kind="trait"``: ``(line, userId, email, value)``, the JSON type kept.

    ``line`` is the 1-based line of the deciding event; ``email`` is the latest non-empty one
    seen for the user in any counted event, or None (the caller rejects such a row).

    The whole file is read before the first chunk, so a broken export (invalid JSON, a
    counted event without ``userId`` or without a value) raises SourceError and yields
    nothing. Memory: a dict entry per user with an event for this key, so it grows with the
    computation's size, not with the file's.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    decided: dict[str, tuple[_Order, Any]] = {}  # user -> (order, membership or value)
    emails: dict[str, tuple[_Order, Any]] = {}
    clock = _BEGINNING
    try:
        with path.open(encoding="utf-8-sig") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                event = _parse(path, line_number, line)
                clock = _timestamp(event) or clock
                if _key_and_class(event) != (computation_key, kind):
                    continue
                user = _user_id(path, line_number, event)
                order = (clock, line_number)
                value = _value(path, line_number, event, computation_key, kind)
                if user not in decided or order > decided[user][0]:
                    decided[user] = (order, value)
                email = _email(event)
                if email is not None and (user not in emails or order > emails[user][0]):
                    emails[user] = (order, email)
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8: {exc.reason}") from exc
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from exc

    rows: list[SourceRow] = [
        (order[1], user, emails.get(user, (None, None))[1], None if kind == "audience" else value)
        for user, (order, value) in decided.items()
        if kind == "trait" or value is True
    ]
    rows.sort(key=lambda row: row[0])
    for start in range(0, len(rows), chunk_size):
        yield rows[start : start + chunk_size]


def _parse(path: Path, line_number: int, line: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError as exc:  # bad JSON, or an integer too long for Python (4,300 digits)
        raise SourceError(f"{path}: line {line_number}: invalid JSON: {exc}") from exc
    if not isinstance(event, dict):
        raise SourceError(f"{path}: line {line_number}: expected a JSON object")
    return event


def _key_and_class(event: dict[str, Any]) -> tuple[Any, Any]:
    """The event's (computation key, class), or Nones for events that are not Engage's."""
    if event.get("type") not in ("identify", "track"):
        return None, None
    personas = _object(_object(event.get("context")).get("personas"))
    properties = _object(event.get("properties"))
    key = personas.get("computation_key")
    if key is None:
        key = properties.get("audience_key", properties.get("trait_key"))
    klass = personas.get("computation_class")
    if klass is None:  # no personas context: the track event's own fields say which
        if "audience_key" in properties or event.get("event") in (_ENTERED, _EXITED):
            klass = "audience"
        elif "trait_key" in properties or event.get("event") == _COMPUTED:
            klass = "trait"
    return key, klass


def _user_id(path: Path, line_number: int, event: dict[str, Any]) -> str:
    user = event.get("userId")
    try:
        return canonical_user_id(user)
    except ValueError as exc:
        raise SourceError(
            f"{path}: line {line_number}: Engage event without a usable userId "
            f"(got {user!r}: {exc})"
        ) from None


def _value(path: Path, line_number: int, event: dict[str, Any], key: str, kind: str) -> Any:
    """Membership (a bool) for audiences, the computed value (any JSON) for traits."""
    holder = "traits" if event["type"] == "identify" else "properties"
    value = _object(event.get(holder)).get(key, _MISSING)
    if kind == "audience":
        if value is _MISSING and event["type"] == "track":
            # Engage names the event after the change when the property is absent.
            value = _MEMBERSHIP_BY_EVENT.get(event.get("event"), _MISSING)
        if not isinstance(value, bool):
            shown = "nothing" if value is _MISSING else repr(value)
            raise SourceError(
                f"{path}: line {line_number}: {holder}.{key} must be true or false (got {shown})"
            )
    elif value is _MISSING:
        raise SourceError(f"{path}: line {line_number}: no {holder}.{key} in a trait event")
    return value


def _email(event: dict[str, Any]) -> Any:
    """The first non-empty email the event carries (identify traits, properties, context)."""
    for holder in (
        event.get("traits"),
        event.get("properties"),
        _object(event.get("context")).get("traits"),
    ):
        email = _object(holder).get("email")
        if email is not None and not (isinstance(email, str) and not email.strip(WHITE_SPACE)):
            return email
    return None


def _timestamp(event: dict[str, Any]) -> datetime | None:
    """The event's time when it carries a readable one; without, file order decides."""
    for field in _TIME_FIELDS:
        raw = event.get(field)
        if isinstance(raw, str):
            try:
                moment = datetime.fromisoformat(raw)
            except ValueError:
                continue
            # naive and aware times cannot be compared; Segment's are UTC
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
