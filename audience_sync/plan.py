"""Staging a source snapshot, the set-based diff against acknowledged state, and the plan."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, time
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Boolean,
    Engine,
    Text,
    and_,
    cast,
    delete,
    exists,
    false,
    func,
    literal,
    null,
    or_,
    select,
    true,
    union_all,
)
from sqlalchemy import insert as generic_insert
from sqlalchemy.engine import Connection

from audience_sync.errors import StopRequestedError
from audience_sync.models import member_changes as changes
from audience_sync.models import (
    memberships,
    rejected_rows,
    staged_members,
    trait_values,
    uncertain_members,
)
from audience_sync.sources import Source, SourceRow

EMAIL_PATTERN = re.compile(r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s.\x00-\x1f\x7f]+$")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
MAX_USER_ID = 255
MAX_EMAIL = 320

staged = staged_members


@dataclass(frozen=True)
class StageResult:
    """What loading a source into staging saw."""

    source_rows: int
    rejected: int


@dataclass(frozen=True)
class Diff:
    """How the staged snapshot differs from what Gist acknowledged."""

    members: int
    acknowledged: int
    entered: int
    exited: int

    def is_mass_exit(self, threshold: float, min_members: int) -> bool:
        """True when the exits exceed ``threshold`` of an audience of ``min_members``+,
        or when a source that had members now returns none at all (a broken query's
        favourite symptom), whatever the audience's size."""
        if self.acknowledged == 0:
            return False
        if self.members == 0:
            return True
        return self.acknowledged >= min_members and self.exited / self.acknowledged > threshold


def check_row(row: SourceRow) -> tuple[str, str] | str:
    """``(user_id, email)`` cleaned, or the reason the row cannot be used."""
    user_id, email = row.user_id, row.email
    if type(user_id) is str and type(email) is str:
        # The common case, checked in as few steps as possible: it runs once per source row.
        user_id, email = user_id.strip(), email.strip()
        if (
            user_id
            and len(user_id) <= MAX_USER_ID
            and len(email) <= MAX_EMAIL
            and EMAIL_PATTERN.match(email)
            and not CONTROL_CHARACTERS.search(user_id)
        ):
            return user_id, email
    if isinstance(user_id, bool) or not isinstance(user_id, str | int):
        return (
            "missing user_id" if user_id is None else f"user_id has type {type(user_id).__name__}"
        )
    user_id = str(user_id).strip()
    if not user_id:
        return "missing user_id"
    if len(user_id) > MAX_USER_ID:
        return f"user_id longer than {MAX_USER_ID} characters"
    if CONTROL_CHARACTERS.search(user_id):
        return "user_id contains control characters"
    if email is None or (isinstance(email, str) and not email.strip()):
        return "missing email"
    if not isinstance(email, str):
        return f"email has type {type(email).__name__}"
    email = email.strip()
    if len(email) > MAX_EMAIL:
        return f"email longer than {MAX_EMAIL} characters"
    if not EMAIL_PATTERN.match(email):
        return "invalid email"
    return user_id, email


def encode_value(value: Any, value_type: str | None = None) -> str:
    """A trait value as canonical JSON, so 1, 1.0, "1" and true stay four different values.

    CSV gives strings: ``value_type`` (int, float, bool, string) converts them. SQL types map
    to their JSON kin: exact decimals with no fraction digits to integers, other decimals to
    floats, dates and times to ISO strings. Raises ValueError with the reason otherwise.
    """
    if value_type is not None and isinstance(value, str):
        value = _convert(value.strip(), value_type)
    if isinstance(value, Decimal):
        value = int(value) if int(value.as_tuple().exponent) >= 0 else float(value)
    elif isinstance(value, date | time):
        value = value.isoformat()
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError(f"value of type {type(value).__name__} cannot be sent") from None


def _convert(text: str, value_type: str) -> Any:
    if text == "":
        return None  # an empty cell is no value
    try:
        if value_type == "int":
            return int(text)
        if value_type == "float":
            return float(text)
    except ValueError:
        raise ValueError(f"value {text[:50]!r} is not {value_type}") from None
    if value_type == "bool":
        lowered = text.lower()
        if lowered in BOOLEANS:
            return BOOLEANS[lowered]
        raise ValueError(f"value {text[:50]!r} is not bool")
    return text


BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def stage_source(
    engine: Engine,
    run_id: int,
    source: Source,
    should_stop: Callable[[], bool] = lambda: False,
    on_rows: Callable[[int], None] = lambda rows: None,
    *,
    with_value: bool = False,
    value_type: str | None = None,
) -> StageResult:
    """Stream ``source`` into ``staged_members`` in chunks; a duplicate user keeps its first row.

    ``with_value``: a computed trait's source, whose ``value`` is staged as canonical JSON.
    """
    total = rejected = 0
    for chunk in source.read_chunks():
        if should_stop():
            raise StopRequestedError("stopped by a signal while reading the source")
        members: dict[str, tuple[str, str | None]] = {}
        bad: list[dict[str, Any]] = []
        for row in chunk:
            checked = check_row(row)
            value: str | None = None
            if with_value and not isinstance(checked, str):
                try:
                    value = encode_value(row.value, value_type)
                except ValueError as exc:
                    checked = str(exc)
            if isinstance(checked, str):
                bad.append(
                    {
                        "run_id": run_id,
                        "row_number": row.row_number,
                        "user_id": _clip(row.user_id),
                        "email": _clip(row.email),
                        "reason": checked,
                    }
                )
            else:
                members.setdefault(checked[0], (checked[1], value))
        total += len(chunk)
        rejected += len(bad)
        with engine.begin() as connection:
            if members:
                # Straight to the driver's executemany: SQLAlchemy's per-row parameter
                # processing cost more than the insert itself.
                rows = [(run_id, u, e, v) for u, (e, v) in members.items()]
                if engine.dialect.name != "postgresql" or not _copy_rows(connection, rows):
                    connection.exec_driver_sql(_stage_sql(engine), rows)
            if bad:
                connection.execute(generic_insert(rejected_rows), bad)
        on_rows(len(chunk))
    return StageResult(source_rows=total, rejected=rejected)


def _copy_rows(connection: Connection, rows: list[tuple[Any, ...]]) -> bool:
    """PostgreSQL's COPY into staging, several times faster than inserts; False when a user
    is already staged (a duplicate across chunks), so the caller inserts this chunk with
    ON CONFLICT DO NOTHING instead."""
    savepoint = connection.begin_nested()
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy("COPY staged_members (run_id, user_id, email, value) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != "23505":  # unique_violation
            raise
        savepoint.rollback()
        return False
    finally:
        cursor.close()
    savepoint.commit()
    return True


def _stage_sql(engine: Engine) -> str:
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    return (
        "INSERT INTO staged_members (run_id, user_id, email, value) "
        f"VALUES ({mark}, {mark}, {mark}, {mark}) ON CONFLICT DO NOTHING"
    )


def analyze(engine: Engine) -> None:
    """Refresh PostgreSQL's statistics after staging: planning the anti-joins on a freshly
    filled staging table without them picks nested loops (20k members: 11 s instead of
    0.3 s). Sampling keeps it cheap at any size. SQLite plans from its indexes alone."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "ANALYZE staged_members, memberships, uncertain_members, trait_values, "
                "rejected_rows"
            )


def load_diff(engine: Engine, run_id: int, audience_key: str) -> Diff:
    """Count members, acknowledged members, entries and exits (a dry run's plan, unwritten)."""
    members, acknowledged = _sizes(engine, run_id, audience_key)
    with engine.connect() as connection:
        entered = connection.scalar(
            select(func.count()).select_from(_entered(run_id, audience_key).subquery())
        )
        exited = connection.scalar(
            select(func.count()).select_from(_exited(run_id, audience_key).subquery())
        )
    return Diff(members, acknowledged, entered or 0, exited or 0)


def _sizes(
    engine: Engine, run_id: int, audience_key: str, *, trait: bool = False
) -> tuple[int, int]:
    """How many members the snapshot has, and how many Gist acknowledged."""
    acknowledged_query = (
        select(func.count()).where(trait_values.c.trait_key == audience_key)
        if trait
        else select(func.count()).where(memberships.c.audience_key == audience_key)
    )
    with engine.connect() as connection:
        members = connection.scalar(
            select(func.count()).select_from(staged).where(staged.c.run_id == run_id)
        )
        acknowledged = connection.scalar(acknowledged_query)
    return members or 0, acknowledged or 0


# Typed NULLs: PostgreSQL cannot guess the type of a bare NULL in a UNION.
NO_VALUE = cast(null(), Boolean)

PLAN_COLUMNS = [
    "run_id", "audience_key", "user_id", "email", "value", "value_json", "status", "attempts",
]  # fmt: skip


def save_plan(engine: Engine, run_id: int, audience_key: str) -> Diff:
    """Write the run's entries and exits as ``pending`` changes and return the diff.

    The anti-joins run once, to write the plan; the counts come from the (small) plan.
    """
    _save(
        engine, run_id, audience_key, _entered(run_id, audience_key), _exited(run_id, audience_key)
    )
    members, acknowledged = _sizes(engine, run_id, audience_key)
    with engine.connect() as connection:
        by_value: dict[bool, int] = dict(
            connection.execute(
                select(changes.c.value, func.count())
                .where(changes.c.run_id == run_id)
                .group_by(changes.c.value)
            ).all()
        )
    return Diff(members, acknowledged, by_value.get(True, 0), by_value.get(False, 0))


def save_trait_plan(engine: Engine, run_id: int, trait_key: str, on_missing: str) -> Diff:
    """Plan each staged value Gist does not hold (or may not), and ``null`` for users gone
    from the source when ``on_missing`` is "null"; return the diff (exited = nulls)."""
    _save(engine, run_id, trait_key, _trait_changed(run_id, trait_key))
    changed = _count_planned(engine, run_id)
    if on_missing == "null":
        _save(engine, run_id, trait_key, _trait_missing(run_id, trait_key))
    members, acknowledged = _sizes(engine, run_id, trait_key, trait=True)
    return Diff(members, acknowledged, changed, _count_planned(engine, run_id) - changed)


def load_trait_diff(engine: Engine, run_id: int, trait_key: str, on_missing: str) -> Diff:
    """The counts of ``save_trait_plan`` without writing the plan (a dry run)."""
    members, acknowledged = _sizes(engine, run_id, trait_key, trait=True)
    with engine.connect() as connection:
        changed = connection.scalar(
            select(func.count()).select_from(_trait_changed(run_id, trait_key).subquery())
        )
        missing: int | None = 0
        if on_missing == "null":
            missing = connection.scalar(
                select(func.count()).select_from(_trait_missing(run_id, trait_key).subquery())
            )
    return Diff(members, acknowledged, changed or 0, missing or 0)


def mark_events(engine: Engine, run_id: int) -> None:
    """Give every change of the run a track event to send once the change is acknowledged."""
    with engine.begin() as connection:
        connection.execute(
            changes.update().where(changes.c.run_id == run_id).values(event_status="pending")
        )


def discard_plan(engine: Engine, run_id: int) -> None:
    """Drop a run's plan before anything of it was sent (the mass-exit guard)."""
    with engine.begin() as connection:
        connection.execute(delete(changes).where(changes.c.run_id == run_id))


def save_backfill_plan(
    engine: Engine, run_id: int, audience_key: str, resumed_runs: Sequence[int], *, trait: bool
) -> int:
    """Plan ``true`` for every staged member, except those already delivered by the
    unfinished backfill runs in ``resumed_runs`` (so a backfill resumes, not restarts).
    Returns how many changes were planned."""
    done = exists().where(
        changes.c.run_id.in_(resumed_runs),
        changes.c.user_id == staged.c.user_id,
        changes.c.status == "delivered",
    )
    row = (
        _plan_row(run_id, audience_key, staged.c.user_id, staged.c.email, NO_VALUE, staged.c.value)
        if trait
        else _plan_row(run_id, audience_key, staged.c.user_id, staged.c.email, true())
    )
    query = select(*row).where(staged.c.run_id == run_id, ~done)
    _save(engine, run_id, audience_key, query)
    return _count_planned(engine, run_id)


def save_retire_plan(engine: Engine, run_id: int, audience_key: str) -> int:
    """Plan ``false`` for everyone Gist may hold in the audience (acknowledged or uncertain),
    or ``null`` for every value of a computed trait. Returns how many changes were planned."""
    also_acknowledged = exists().where(
        memberships.c.audience_key == audience_key,
        memberships.c.user_id == uncertain_members.c.user_id,
    )
    acknowledged = select(
        *_plan_row(run_id, audience_key, memberships.c.user_id, memberships.c.email, false())
    ).where(memberships.c.audience_key == audience_key)
    with engine.connect() as connection:
        is_trait = connection.scalar(
            select(func.count()).where(trait_values.c.trait_key == audience_key)
        )
    if is_trait:
        # A retired computed trait: its values become null, like a user who dropped out.
        _save(engine, run_id, audience_key, _trait_missing(run_id, audience_key))
        return _count_planned(engine, run_id)
    uncertain = select(
        *_plan_row(
            run_id, audience_key, uncertain_members.c.user_id, uncertain_members.c.email, false()
        )
    ).where(uncertain_members.c.audience_key == audience_key, ~also_acknowledged)
    _save(engine, run_id, audience_key, union_all(acknowledged, uncertain))
    return _count_planned(engine, run_id)


def _save(engine: Engine, run_id: int, audience_key: str, *queries: Any) -> None:
    with engine.begin() as connection:
        # Each plan re-plans everything still owed, so older pending rows would duplicate it.
        connection.execute(
            changes.update()
            .where(
                changes.c.audience_key == audience_key,
                changes.c.status == "pending",
                changes.c.run_id != run_id,
            )
            .values(status="superseded")
        )
        for query in queries:
            connection.execute(changes.insert().from_select(PLAN_COLUMNS, query))


def _count_planned(engine: Engine, run_id: int) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).where(changes.c.run_id == run_id)) or 0)


def _plan_row(
    run_id: int, audience_key: str, user_id: Any, email: Any, value: Any, value_json: Any = None
) -> list[Any]:
    return [
        literal(run_id),
        literal(audience_key),
        user_id,
        email,
        value,
        cast(null(), Text) if value_json is None else value_json,
        literal("pending"),
        literal(0),
    ]


def _trait_changed(run_id: int, trait_key: str) -> Any:
    """Staged values Gist is not known to hold: never acknowledged, different, or uncertain."""
    same = exists().where(
        trait_values.c.trait_key == trait_key,
        trait_values.c.user_id == staged.c.user_id,
        trait_values.c.value == staged.c.value,
    )
    uncertain = exists().where(
        uncertain_members.c.audience_key == trait_key,
        uncertain_members.c.user_id == staged.c.user_id,
    )
    row = _plan_row(run_id, trait_key, staged.c.user_id, staged.c.email, NO_VALUE, staged.c.value)
    return select(*row).where(staged.c.run_id == run_id, or_(~same, uncertain))


def _trait_missing(run_id: int, trait_key: str) -> Any:
    """Users gone from the source whose value in Gist may not be null yet."""
    nothing = literal("null")
    acknowledged = select(
        *_plan_row(
            run_id, trait_key, trait_values.c.user_id, trait_values.c.email, NO_VALUE, nothing
        )
    ).where(
        trait_values.c.trait_key == trait_key,
        trait_values.c.value != "null",
        _gone(run_id, trait_values.c.user_id),
    )
    known = exists().where(
        trait_values.c.trait_key == trait_key,
        trait_values.c.user_id == uncertain_members.c.user_id,
    )
    uncertain = select(
        *_plan_row(
            run_id, trait_key, uncertain_members.c.user_id, uncertain_members.c.email, NO_VALUE,
            nothing,
        )
    ).where(
        uncertain_members.c.audience_key == trait_key,
        ~known,
        _gone(run_id, uncertain_members.c.user_id),
    )  # fmt: skip
    return union_all(acknowledged, uncertain)


def _gone(run_id: int, user_id: Any) -> Any:
    """Not in this run's snapshot, and not a row of it that was rejected (a glitch is not
    a departure)."""
    present = exists().where(staged.c.run_id == run_id, staged.c.user_id == user_id)
    glitch = exists().where(rejected_rows.c.run_id == run_id, rejected_rows.c.user_id == user_id)
    return and_(~present, ~glitch)


def clear_staging(engine: Engine, run_id: int) -> None:
    """Drop a run's snapshot once its plan is written."""
    with engine.begin() as connection:
        connection.execute(delete(staged).where(staged.c.run_id == run_id))


def _entered(run_id: int, audience_key: str) -> Any:
    """Staged members Gist is not known to hold: never acknowledged, or left uncertain."""
    acknowledged = exists().where(
        memberships.c.audience_key == audience_key, memberships.c.user_id == staged.c.user_id
    )
    uncertain = exists().where(
        uncertain_members.c.audience_key == audience_key,
        uncertain_members.c.user_id == staged.c.user_id,
    )
    row = _plan_row(run_id, audience_key, staged.c.user_id, staged.c.email, true())
    return select(*row).where(staged.c.run_id == run_id, or_(~acknowledged, uncertain))


def _exited(run_id: int, audience_key: str) -> Any:
    """Members Gist may hold (acknowledged, or left uncertain) who are gone from the source.

    A user whose row was rejected this run is not gone: a glitch in their row (say a NULL
    email) must not send them ``false``.
    """

    acknowledged = select(
        *_plan_row(run_id, audience_key, memberships.c.user_id, memberships.c.email, false())
    ).where(memberships.c.audience_key == audience_key, _gone(run_id, memberships.c.user_id))
    also_acknowledged = exists().where(
        memberships.c.audience_key == audience_key,
        memberships.c.user_id == uncertain_members.c.user_id,
    )
    uncertain = select(
        *_plan_row(
            run_id, audience_key, uncertain_members.c.user_id, uncertain_members.c.email, false()
        )
    ).where(
        uncertain_members.c.audience_key == audience_key,
        ~also_acknowledged,
        _gone(run_id, uncertain_members.c.user_id),
    )
    return union_all(acknowledged, uncertain)


def _clip(value: Any, limit: int = 500) -> str | None:
    """A bounded, storable text form of a bad value, for the rejected_rows table.

    Stripped like a good value, so a rejected row's user_id matches their memberships.
    """
    if value is None:
        return None
    text = str(value).strip().replace("\x00", "\\x00")  # PostgreSQL text cannot hold NUL
    return text if len(text) <= limit else text[:limit] + "…"
