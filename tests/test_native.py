"""Warehouse-native staging: an audience whose query runs on the PostgreSQL state database
itself is staged with SQL alone — the same checks and plan as the Python path, no row in
Python — and `source = "state"` works on SQLite too (through Python)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.pool import NullPool

from audience_sync.fakegist import FakeGist
from audience_sync.metrics import Metrics
from audience_sync.models import member_changes, rejected_rows
from audience_sync.stage import TEXT_TYPES, WHOLE_TYPES, _checked_rows, column_types
from audience_sync.sync import RunResult, run_once
from tests.conftest import Workspace, require_postgres

# Warehouse-native staging exists on a PostgreSQL state only.
postgres_state = pytest.mark.parametrize(
    "state_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)

ROWS: list[tuple[Any, Any]] = [
    ("u1", "u1@example.com"),
    ("  u2 ", " u2@example.com "),  # trimmed, like the Python path
    ("u1", "later@example.com"),  # a duplicate: the first row wins
    ("u3", None),  # missing email
    ("u4", "not an email"),
    ("", "blank@example.com"),  # missing user_id
    ("u\x01", "ctl@example.com"),
    ("x" * 300, "long@example.com"),
]


@pytest.fixture
def warehouse(workspace: Workspace) -> Iterator[str]:
    """A schema of the state's PostgreSQL database holding a `members` table."""
    admin = require_postgres()
    schema = f"wh_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        connection.execute(
            text(f'CREATE TABLE "{schema}".members (pos serial, user_id text, email text)')
        )
    try:
        yield schema
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def fill(schema: str, rows: list[tuple[Any, Any]], table: str = "members") -> None:
    admin = require_postgres()
    engine = create_engine(admin, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text(f'TRUNCATE "{schema}".{table}'))
        for user_id, email in rows:
            connection.execute(
                text(f'INSERT INTO "{schema}".{table} (user_id, email) VALUES (:u, :e)'),
                {"u": user_id, "e": email},
            )
    engine.dispose()


def query(schema: str) -> str:
    return f'SELECT user_id, email FROM "{schema}".members ORDER BY pos'


def plan_of(engine: Engine, run: RunResult) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        changes = connection.execute(
            select(member_changes.c.user_id, member_changes.c.email, member_changes.c.value)
            .where(member_changes.c.run_id == run.run_id)
            .order_by(member_changes.c.user_id)
        ).all()
        rejected = connection.execute(
            select(rejected_rows.c.row_number, rejected_rows.c.user_id, rejected_rows.c.reason)
            .where(rejected_rows.c.run_id == run.run_id)
            .order_by(rejected_rows.c.row_number)
        ).all()
    return [tuple(r) for r in changes] + [tuple(r) for r in rejected]


@postgres_state
def test_a_query_on_the_state_database_is_staged_inside_it(
    workspace: Workspace, engine: Engine, gist: FakeGist, warehouse: str
) -> None:
    fill(warehouse, ROWS)
    workspace.audiences.append({"name": "VIP", "source": "state", "query": query(warehouse)})
    workspace.write_config()

    [run] = run_once(workspace.settings(), engine)

    assert (run.status, run.staged_in) == ("succeeded", "database")
    assert (run.source_rows, run.members, run.rejected, run.delivered) == (8, 2, 5, 2)
    assert {r.body["user_id"]: r.body["email"] for r in gist.requests("/contacts")} == {
        "u1": "u1@example.com",
        "u2": "u2@example.com",
    }
    with engine.connect() as connection:
        reasons = connection.execute(
            select(rejected_rows.c.row_number, rejected_rows.c.reason).order_by(
                rejected_rows.c.row_number
            )
        ).all()
    assert [tuple(r) for r in reasons] == [
        (4, "missing email"),
        (5, "invalid email"),
        (6, "missing user_id"),
        (7, "user_id contains control characters or invalid Unicode"),
        (8, "user_id longer than 255 characters"),
    ]
    metrics = Metrics()
    metrics.record_results([run])
    assert metrics.source_rows.labels("vip", "database")._value.get() == 8

    fill(warehouse, [("u2", "u2@example.com"), ("u9", "u9@example.com")])  # churn
    gist.clear_log()
    [churn] = run_once(workspace.settings(), engine)
    sent = {r.body["user_id"]: r.body["custom_properties"]["vip"] for r in gist.requests()}
    assert (churn.entered, churn.exited, sent) == (1, 1, {"u1": False, "u9": True})


@postgres_state
def test_native_and_python_paths_plan_the_same(
    workspace: Workspace, engine: Engine, gist: FakeGist, warehouse: str, tmp_path: Path
) -> None:
    fill(warehouse, ROWS)
    # The same database under another spelling of its URL: rows go through Python.
    admin = require_postgres()
    other = admin.replace("127.0.0.1", "localhost")
    workspace.audiences.append(
        {"name": "Native", "key": "native", "source": "state", "query": query(warehouse)}
    )
    workspace.sources["warehouse"] = other
    workspace.audiences.append(
        {"name": "Python", "key": "python", "source": "warehouse", "query": query(warehouse)}
    )
    workspace.write_config()

    native, python = run_once(workspace.settings(), engine, dry_run=True)

    assert (native.staged_in, python.staged_in) == ("database", "python")
    assert plan_of(engine, native) == plan_of(engine, python)


@postgres_state
def test_numbers_and_uuids_are_canonical_ids_in_sql_too(
    workspace: Workspace, engine: Engine, gist: FakeGist, warehouse: str
) -> None:
    ids = [uuid.uuid4() for _ in range(2)]
    numbers = (
        "SELECT * FROM (VALUES (42::numeric, 'a@example.com'), (42.0, 'dup@example.com'), "
        "(7, 'b@example.com'), (42.5, 'c@example.com')) AS t(user_id, email)"
    )
    uuids = ", ".join(f"('{i}'::uuid, 'v{n}@example.com')" for n, i in enumerate(ids))
    workspace.audiences.append({"name": "Numbers", "source": "state", "query": numbers})
    workspace.audiences.append(
        {
            "name": "Uuids",
            "source": "state",
            "query": f"SELECT * FROM (VALUES {uuids}) AS t(user_id, email)",
        }
    )
    workspace.write_config()

    number_run, uuid_run = run_once(workspace.settings(), engine)

    assert (number_run.members, number_run.rejected) == (2, 1)
    assert set(gist.properties("numbers")) == {"42", "7"}
    assert gist.contacts()["42"]["email"] == "a@example.com"  # the first row wins
    assert (uuid_run.status, uuid_run.members) == ("succeeded", 2)
    assert set(gist.properties("uuids")) == {str(i) for i in ids}
    with engine.connect() as connection:
        [reason] = connection.scalars(
            select(rejected_rows.c.reason).where(rejected_rows.c.run_id == number_run.run_id)
        )
    assert reason == "user_id 42.5 is not a whole number"


@postgres_state
def test_a_writing_query_is_refused_and_writes_nothing(
    workspace: Workspace, engine: Engine, gist: FakeGist, warehouse: str
) -> None:
    fill(warehouse, [("u1", "u1@example.com")])
    sneaky = (
        f'SELECT * FROM (WITH gone AS (DELETE FROM "{warehouse}".members RETURNING user_id, '
        "email) SELECT user_id, email FROM gone) AS q"
    )
    workspace.audiences.append({"name": "Sneaky", "source": "state", "query": sneaky})
    workspace.write_config()

    [run] = run_once(workspace.settings(), engine)

    assert run.status == "failed"
    assert "must be read-only" in (run.error or "")
    admin = require_postgres()
    check = create_engine(admin, poolclass=NullPool)
    with check.connect() as connection:
        left = connection.scalar(text(f'SELECT count(*) FROM "{warehouse}".members'))
    check.dispose()
    assert left == 1


@postgres_state
def test_a_query_with_percent_signs_and_missing_columns(
    workspace: Workspace, engine: Engine, gist: FakeGist, warehouse: str
) -> None:
    fill(warehouse, [("u1", "u1@example.com"), ("x1", "x1@example.com")])
    workspace.audiences.append(
        {
            "name": "Like",
            "source": "state",
            "query": f"SELECT user_id, email FROM \"{warehouse}\".members WHERE user_id LIKE 'u%'",
        }
    )
    workspace.audiences.append(
        {"name": "Wrong", "source": "state", "query": f'SELECT user_id FROM "{warehouse}".members'}
    )
    workspace.write_config()

    like, wrong = run_once(workspace.settings(), engine)

    assert (like.status, like.members) == ("succeeded", 1)
    assert wrong.status == "failed"
    assert "must return columns user_id and email" in (wrong.error or "")


def test_state_source_on_sqlite_reads_through_python(tmp_path: Path, gist: FakeGist) -> None:
    from audience_sync import db

    state = tmp_path / "state.db"
    workspace = Workspace(tmp_path, f"sqlite:///{state}", gist.url)
    engine = db.make_engine(workspace.state_url)
    db.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE people (id TEXT, mail TEXT)"))
        connection.execute(text("INSERT INTO people VALUES ('u1', 'u1@example.com')"))
    workspace.audiences.append(
        {
            "name": "People",
            "source": "state",
            "query": "SELECT id AS user_id, mail AS email FROM people",
        }
    )
    workspace.write_config()
    settings = workspace.settings()

    [run] = run_once(settings, engine)
    engine.dispose()

    assert (run.status, run.staged_in, run.delivered) == ("succeeded", "python", 1)


SAMPLES = [
    "'u1'", "'  u2 '", "''", "'   '", "NULL", "E'u\\x01'", "repeat('x', 300)",
    "'a@example.com'", "' b@example.com '", "'not an email'", "E'c@exam\\x02ple.com'",
    "repeat('y', 400) || '@example.com'", "'d@@example.com'",
]  # fmt: skip
TYPED = [  # (SQL type, whether the checks are written for it, samples)
    ("text", True, SAMPLES),
    ("character varying(500)", True, SAMPLES),
    ("character(12)", True, ["'u1'", "'  u2 '", "''", "NULL", "'e@example.com'"]),
    ("name", True, ["'u1'", "' u2 '", "''", "NULL"]),
    ("uuid", True, ["'5f0c6d0e-8d5b-4a58-9a0e-0d1b8e3f2a61'", "NULL"]),
    ("integer", True, ["42", "-7", "0", "NULL"]),
    ("bigint", True, ["9007199254740993", "NULL"]),
    ("smallint", True, ["3", "NULL"]),
    ("numeric", False, ["42", "42.0", "42.5", "NULL"]),
    ("double precision", False, ["1.5", "2", "'NaN'", "NULL"]),
    ("boolean", False, ["true", "NULL"]),
    ("jsonb", False, ["'\"u9\"'", "'9'", "'[1]'", "NULL"]),
    ("date", False, ["'2026-12-02'", "NULL"]),
]


@postgres_state
@pytest.mark.parametrize(("sql_type", "specialised", "samples"), TYPED)
def test_checks_written_for_the_column_types_reject_and_keep_what_the_general_ones_do(
    engine: Engine, sql_type: str, specialised: bool, samples: list[str]
) -> None:
    # Every value as a user id and as an email, each pairing once, in one query.
    values = ", ".join(f"(({u})::{sql_type}, ({e})::{sql_type})" for u in samples for e in samples)
    mixed = ", ".join(f"(({u})::{sql_type}, 'ok@example.com')" for u in samples)
    with engine.connect() as connection:
        for rows, count in ((values, len(samples) ** 2), (mixed, len(samples))):
            query = f"SELECT * FROM (VALUES {rows}) AS t(user_id, email)"
            types = column_types(connection, query)
            if sql_type.startswith(("character varying", "character(")):
                assert types[0].startswith("character")
            else:
                assert types[0] == sql_type
            general = connection.exec_driver_sql(_checked_rows(query)).all()
            written = connection.exec_driver_sql(_checked_rows(query, *types)).all()
            assert written == general
            assert len(general) == count
            assert (types[0] in TEXT_TYPES | WHOLE_TYPES) == specialised
