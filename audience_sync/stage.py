"""Staging a source snapshot: rows checked, deduplicated and written to ``staged_members``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete
from sqlalchemy import insert as generic_insert
from sqlalchemy.engine import Connection

from audience_sync.errors import StopRequestedError
from audience_sync.models import rejected_rows, staged_members
from audience_sync.rows import canonical_user_id, check_row, encode_value
from audience_sync.sources import Source


@dataclass(frozen=True)
class StageResult:
    """What loading a source into staging saw."""

    source_rows: int
    rejected: int
    first_rejection: str | None = None  # the reason of the first rejected row


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
    first_rejection: str | None = None
    for chunk in source.read_chunks():
        if should_stop():
            raise StopRequestedError("stopped by a signal while reading the source")
        members: dict[str, tuple[str, str | None]] = {}
        bad: list[dict[str, Any]] = []
        for row in chunk:
            checked = check_row(row.user_id, row.email)
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
                        "user_id": rejected_user_id(row.user_id),
                        "email": _clip(row.email),
                        "reason": checked,
                    }
                )
            else:
                members.setdefault(checked[0], (checked[1], value))
        total += len(chunk)
        rejected += len(bad)
        if bad and first_rejection is None:
            first_rejection = f"row {bad[0]['row_number']}: {bad[0]['reason']}"
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
    return StageResult(source_rows=total, rejected=rejected, first_rejection=first_rejection)


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
                "rejected_rows, contacts"
            )


def clear_staging(engine: Engine, run_ids: list[int]) -> None:
    """Drop the snapshots of ``run_ids`` once their plans are written."""
    if run_ids:
        with engine.begin() as connection:
            connection.execute(delete(staged_members).where(staged_members.c.run_id.in_(run_ids)))


def rejected_user_id(value: Any) -> str | None:
    """How a rejected row names its user: canonical when it can be, so the rejected row of a
    member (say with a broken email) matches their membership and protects it."""
    try:
        return canonical_user_id(value)
    except ValueError:
        return _clip(value)


def _clip(value: Any, limit: int = 500) -> str | None:
    """A bounded, storable text form of a bad value, for the rejected_rows table."""
    if value is None:
        return None
    text = str(value).strip().replace("\x00", "\\x00")  # PostgreSQL text cannot hold NUL
    # Nor can any UTF-8 column hold a lone surrogate: show it escaped.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"
