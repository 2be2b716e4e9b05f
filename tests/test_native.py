"""Warehouse-native staging: an audience whose query runs on the PostgreSQL state database
itself is staged with SQL alone — the same checks and plan as the Python path, no row in
Python — and `source = "state"` works on SQLite too (through Python)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, select, text
from sqlalchemy.pool import NullPool

from audience_sync.fakegist import FakeGist
from audience_sync.metrics import Metrics
from audience_sync.models import member_changes, rejected_rows
from audience_sync.native import (
    Family,
    checked_rows,
    column_families,
    without_trailing_semicolons,
)
from audience_sync.rows import NOT_WHOLE, check_row
from audience_sync.sources import SqlSource
from audience_sync.sync import RunResult, run_once
from tests.conftest import Workspace, require_postgres
from tests.test_stage import USERS, duplicated_rows

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
        if rows:
            connection.execute(
                text(f'INSERT INTO "{schema}".{table} (user_id, email) VALUES (:u, :e)'),
                [{"u": user_id, "e": email} for user_id, email in rows],
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
def test_the_first_row_of_a_user_wins_wherever_postgresql_puts_it(
    workspace: Workspace, engine: Engine, gist: FakeGist, warehouse: str
) -> None:
    fill(warehouse, duplicated_rows())  # rows of varied widths: see test_stage
    workspace.audiences.append({"name": "VIP", "source": "state", "query": query(warehouse)})
    workspace.write_config()

    [run] = run_once(workspace.settings(), engine, dry_run=True)

    assert (run.status, run.staged_in, run.members) == ("succeeded", "database", USERS)
    with engine.connect() as connection:
        emails = connection.scalars(
            select(member_changes.c.email).where(member_changes.c.run_id == run.run_id)
        ).all()
    assert len(emails) == USERS
    assert [email for email in emails if not email.startswith("first.")] == []


# Rows that staged differently natively and through Python (issue 22): Unicode white space
# (which both trim), \x1f (a control character to both, not white space), a "v" at either end
# (native trimmed it: E'\v' is no escape in PostgreSQL), a float beyond 2^53, a jsonb string,
# NaN and Infinity.
DIFFERED = {
    "text": "SELECT * FROM (VALUES (E'\\u00a0t1', 't1@example.com'),"
    " ('t2', E'\\u3000t2@example.com'), (E'\\u2003t3\\u2003', E't3@example.com\\u2028'),"
    " (E'us\\x1f', 'us@example.com'), ('t5', E't5@example.com\\x1f'),"
    " ('v6v', 'steve@example.dev')) AS t(user_id, email)",
    "float": "SELECT * FROM (VALUES (1.2345678901234568e20::float8, 'f1@example.com'),"
    " ('NaN', 'f2@example.com'), ('Infinity', 'f3@example.com'), (42.0, 'f4@example.com'),"
    " (42.5, 'f5@example.com')) AS t(user_id, email)",
    "jsonb": "SELECT * FROM (VALUES ('\"j1\"'::jsonb, 'j1@example.com'), ('7', 'j2@example.com'),"
    " ('true', 'j3@example.com'), ('1.5', 'j4@example.com')) AS t(user_id, email)",
}


@postgres_state
def test_native_and_python_paths_check_white_space_controls_floats_and_jsonb_alike(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    admin = require_postgres()
    workspace.sources["warehouse"] = admin.replace("127.0.0.1", "localhost")  # through Python
    for kind, sql in DIFFERED.items():
        workspace.audiences.append(
            {"name": f"Native {kind}", "key": f"n_{kind}", "source": "state", "query": sql}
        )
        workspace.audiences.append(
            {"name": f"Python {kind}", "key": f"p_{kind}", "source": "warehouse", "query": sql}
        )
    workspace.write_config()

    runs = run_once(workspace.settings(), engine, dry_run=True)

    with engine.connect() as connection:

        def outcome(run: RunResult) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            planned = connection.execute(
                select(member_changes.c.user_id, member_changes.c.email)
                .where(member_changes.c.run_id == run.run_id)
                .order_by(member_changes.c.user_id)
            ).all()
            refused = connection.execute(
                select(rejected_rows.c.row_number, rejected_rows.c.reason)
                .where(rejected_rows.c.run_id == run.run_id)
                .order_by(rejected_rows.c.row_number)
            ).all()
            return [tuple(r) for r in planned], [tuple(r) for r in refused]

        for native, python in zip(runs[::2], runs[1::2], strict=True):
            assert (native.staged_in, python.staged_in) == ("database", "python")
            assert outcome(native) == outcome(python), native.audience_key
        text_plan, _ = outcome(runs[0])
    assert text_plan == [("t1", "t1@example.com"), ("t2", "t2@example.com"),
                         ("t3", "t3@example.com"), ("v6v", "steve@example.dev")]  # fmt: skip


@postgres_state
def test_rejected_rows_are_recorded_as_python_records_them(
    workspace: Workspace, engine: Engine, gist: FakeGist, warehouse: str
) -> None:
    """A review's find: native staging recorded a rejected row's email untrimmed and a long
    user id whole, where Python trims and cuts at 500 characters with "…"."""
    fill(warehouse, [("u1", "  not an email  "), ("x" * 600, "a@example.com"),
                     ("  u3  ", " " + "y" * 700 + " "), ("u4", None)])  # fmt: skip
    admin = require_postgres()
    workspace.sources["warehouse"] = admin.replace("127.0.0.1", "localhost")  # through Python
    for name, source in (("Native", "state"), ("Python", "warehouse")):
        workspace.audiences.append({"name": name, "source": source, "query": query(warehouse)})
    workspace.write_config()

    native, python = run_once(workspace.settings(), engine, dry_run=True)

    def recorded(run: RunResult) -> list[tuple[Any, ...]]:
        with engine.connect() as connection:
            return [tuple(r) for r in connection.execute(
                select(rejected_rows.c.row_number, rejected_rows.c.user_id,
                       rejected_rows.c.email, rejected_rows.c.reason)
                .where(rejected_rows.c.run_id == run.run_id)
                .order_by(rejected_rows.c.row_number)
            )]  # fmt: skip

    assert (native.staged_in, python.staged_in) == ("database", "python")
    assert recorded(native) == recorded(python)
    assert [(u, e) for _, u, e, _ in recorded(native)] == [
        ("u1", "not an email"), ("x" * 500 + "…", "a@example.com"),
        ("u3", "y" * 500 + "…"), ("u4", None),
    ]  # fmt: skip


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
    assert reason == NOT_WHOLE


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


@postgres_state
def test_a_query_ending_in_a_semicolon_or_a_comment_runs_natively(
    workspace: Workspace, engine: Engine, gist: FakeGist, warehouse: str
) -> None:
    fill(warehouse, [("u1", "u1@example.com"), ("u2", "u2@example.com")])
    endings = [";", " -- the VIPs", ";  -- done; really", " /* ; */ ;\n", ";;\n\t"]
    for number, ending in enumerate(endings):
        workspace.audiences.append(
            {"name": f"Q{number}", "source": "state", "query": query(warehouse) + ending}
        )
    workspace.write_config()

    runs = run_once(workspace.settings(), engine, dry_run=True)

    assert [(r.status, r.staged_in, r.members) for r in runs] == [
        ("succeeded", "database", 2)
    ] * len(endings), [r.error for r in runs]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT 1;", "SELECT 1 "),
        ("SELECT 1; -- done", "SELECT 1  -- done"),
        ("SELECT 1;; \n;", "SELECT 1   \n "),
        ("SELECT 1 /* ; */", "SELECT 1 /* ; */"),
        ("SELECT 1 /* a /* nested; */ ; */;", "SELECT 1 /* a /* nested; */ ; */ "),
        ("SELECT ';'", "SELECT ';'"),
        ("SELECT 'it''s;'", "SELECT 'it''s;'"),
        ("SELECT E'\\';'", "SELECT E'\\';'"),
        ('SELECT 1 AS ";"', 'SELECT 1 AS ";"'),
        ("SELECT $$;$$;", "SELECT $$;$$ "),
        ("SELECT $fn$ $$; $fn$", "SELECT $fn$ $$; $fn$"),
        ("SELECT a$b;", "SELECT a$b "),
        ("SELECT 1; SELECT 2", "SELECT 1; SELECT 2"),
        ("SELECT '-- not a comment;'", "SELECT '-- not a comment;'"),
    ],
    ids=[
        "semicolon", "then-comment", "several", "in-comment", "nested-comments", "in-string",
        "doubled-quote", "e-string", "in-identifier", "dollar-quoted", "tagged-dollar",
        "dollar-in-name", "two-statements", "dashes-in-string",
    ],
)  # fmt: skip
def test_only_the_semicolons_that_end_a_query_are_removed(query: str, expected: str) -> None:
    assert without_trailing_semicolons(query) == expected


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


# Values of each column type as SQL literals, to be checked natively and through Python: the
# issue-22 differences (Unicode white space, \x1f, a float beyond 2^53, a jsonb string) first.
TEXTS = [
    "'u1'", "'  u2 '", "''", "'   '", "NULL", "E'u\\x01'", "repeat('x', 300)", "E'\\u00a0u3'",
    "E'u4\\u3000'", "E'\\u2003u5\\u2003'", "E'us\\x1f'", "E'\\x1cu6'", "E'\\u0085u7\\u200b'",
    "'a@example.com'", "' b@example.com '", "'not an email'", "E'c@exam\\x02ple.com'",
    "repeat('y', 400) || '@example.com'", "'d@@example.com'", "E'e@example.com\\u2028'",
    "E'f@example.com\\x1f'", "E'\\u3000g@example.com'", "E'h@exa\\u00a0mple.com'",
]  # fmt: skip
TYPED = [  # (SQL type, its family, samples)
    ("text", "text", TEXTS),
    ("character varying(500)", "text", TEXTS),
    ("character(12)", "text", ["'u1'", "'  u2 '", "''", "NULL", "'e@example.com'"]),
    ("name", "text", ["'u1'", "' u2 '", "''", "NULL", "E'\\u00a0u3'"]),
    ("uuid", "uuid", ["'5f0c6d0e-8d5b-4a58-9a0e-0d1b8e3f2a61'", "NULL"]),
    ("integer", "integer", ["42", "-7", "0", "NULL"]),
    ("bigint", "integer", ["9007199254740993", "-9223372036854775808", "NULL"]),
    ("smallint", "integer", ["3", "NULL"]),
    (
        "numeric",
        "numeric",
        [
            "42",
            "42.0",
            "42.000",
            "42.5",
            "-0.0",
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "1e254",
            "-1e253",
            "1e255",
            "-1e254",
            "1e300 + 0.5",
            "0.000001",
            "NULL",
        ],
    ),
    (
        "double precision",
        "float",
        [
            "1.5",
            "2",
            "-0.0",
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "1.2345678901234568e20",
            "9007199254740991",
            "9007199254740992",
            "-9007199254740992",
            "4503599627370495.5",
            "1e-320",
            "NULL",
        ],
    ),
    ("real", "real", ["1073741888", "0.5", "16777216", "'NaN'", "3e10", "NULL"]),
    ("boolean", "other", ["true", "NULL"]),
    (
        "jsonb",
        "jsonb",
        [
            "'\"j1\"'",
            "'\" j2\\u3000\"'",
            "'9'",
            "'-0'",
            "'42.0'",
            "'1e2'",
            "'1.5'",
            "'1e20'",
            "'1.2345678901234568e20'",
            "'9007199254740993.0'",
            "'0.99999999999999999999'",
            "'1e-400'",
            "'-1e-400'",
            "'1e400'",
            "'true'",
            "'null'",
            "'[1]'",
            "'{\"a\": 1}'",
            "'\"a@example.com\"'",
            "'\" b@example.com \"'",
            "'\"us\\u001f\"'",
            "NULL",
        ],
    ),
    (
        "json",
        "json",
        [
            "'\"j1\"'",
            "'1e2'",
            "'-0'",
            "'1E400'",
            "'1e-400'",
            "'42.0'",
            "'1.25e1'",
            "'[1]'",
            "'null'",
            "'\"a@example.com\"'",
            "NULL",
        ],
    ),
    ("date", "other", ["'2026-12-02'", "NULL"]),
]


def checked_natively(connection: Connection, query: str) -> list[tuple[int, Any]]:
    """(row number, (user_id, email) or the reason) of each row, checked by native SQL."""
    with connection.begin():
        families = column_families(connection, query)
        rows = connection.exec_driver_sql(checked_rows(query, *families)).all()
    return sorted((seq, reason or (user_id, email)) for seq, user_id, email, reason, *_ in rows)


def checked_in_python(url: str, query: str) -> list[tuple[int, Any]]:
    """The same, of the rows psycopg gives a Python reader, by ``rows.check_row``."""
    source = SqlSource(url, query, "python")
    checked = []
    for chunk in source.read_chunks():
        checked += [(number, check_row(user, email)) for number, user, email, _ in chunk]
    return checked


@postgres_state
@pytest.mark.parametrize(
    ("sql_type", "family", "samples"), TYPED, ids=[sql_type for sql_type, *_ in TYPED]
)
def test_native_checks_keep_and_reject_what_python_does_for_every_column_type(
    engine: Engine, state_url: str, sql_type: str, family: Family, samples: list[str]
) -> None:
    as_ids = ", ".join(f"(({u})::{sql_type}, 'ok@example.com')" for u in samples)
    as_emails = ", ".join(f"('u1', ({e})::{sql_type})" for e in samples)
    with engine.connect() as connection:
        for rows in (as_ids, as_emails):
            query = f"SELECT * FROM (VALUES {rows}) AS t(user_id, email)"
            with connection.begin():
                assert column_families(connection, query)[rows is as_emails] == family
            native = checked_natively(connection, query)
            assert native == checked_in_python(state_url, query)
            assert len(native) == len(samples)
