"""Sources: file and SQL readers in chunks, and the user's warehouse is never written."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from audience_sync.errors import SourceError
from audience_sync.rows import (
    _PLAIN_USER_ID,
    EMAIL_PATTERN,
    MAX_EMAIL,
    split_chunk,
    split_plain,
)
from audience_sync.sources import READ_BUFFER, FileSource, SourceRow, SqlSource, first_bad_line
from tests.conftest import require_postgres

USERS = [(1, "a@example.com"), (2, "b@example.com"), (3, "c@example.com")]


def flatten(chunks: Iterator[list[SourceRow]]) -> list[tuple[int, object, object]]:
    return [(number, user_id, email) for chunk in chunks for number, user_id, email, _ in chunk]


def sqlite_warehouse(path: Path, rows: Sequence[tuple[object, object]] = USERS) -> str:
    """A SQLite file with a ``users`` table; returns its SQLAlchemy URL."""
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE users (user_id INTEGER, email TEXT)")
        connection.executemany("INSERT INTO users VALUES (?, ?)", rows)
        connection.commit()
    return f"sqlite:///{path}"


@dataclass
class PgWarehouse:
    """A PostgreSQL source URL and a way to read its ``users`` table on a separate connection."""

    url: str
    rows: Callable[[], list[tuple[object, ...]]]


@pytest.fixture
def pg_warehouse() -> Iterator[PgWarehouse]:
    """A ``users`` table in a fresh schema of database ``test``, dropped afterwards."""
    admin = require_postgres()
    schema = f"w_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin)
    try:
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
            connection.execute(text(f'CREATE TABLE "{schema}".users (user_id int, email text)'))
            connection.execute(
                text(f'INSERT INTO "{schema}".users VALUES (:u, :e)'),
                [{"u": u, "e": e} for u, e in USERS],
            )
            # A query can write through a function even where DECLARE CURSOR refuses DML.
            connection.execute(
                text(
                    f'CREATE FUNCTION "{schema}".purge() RETURNS SETOF "{schema}".users '
                    f"AS 'DELETE FROM \"{schema}\".users RETURNING *' LANGUAGE sql"
                )
            )

        def rows() -> list[tuple[object, ...]]:
            with engine.connect() as connection:
                result = connection.execute(text(f'SELECT * FROM "{schema}".users ORDER BY 1'))
                return [tuple(r) for r in result]

        yield PgWarehouse(f"{admin}?options=-csearch_path%3D{schema}", rows)
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


# ---------------------------------------------------------------- FileSource


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"], ids=["csv", "jsonl"])
def test_file_source_reads_in_chunks(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"members{suffix}"
    members = [(f"u{n}", f"u{n}@example.com") for n in range(7)]
    if suffix == ".csv":
        path.write_text("user_id,email\n" + "".join(f"{u},{e}\n" for u, e in members))
    else:
        path.write_text("".join(json.dumps({"user_id": u, "email": e}) + "\n" for u, e in members))

    chunks = list(FileSource(path).read_chunks(chunk_size=3))

    assert [len(c) for c in chunks] == [3, 3, 1]
    assert flatten(iter(chunks)) == [(n + 1, u, e) for n, (u, e) in enumerate(members)]


def test_csv_with_utf8_bom_header(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    # Excel writes a BOM; it must not become part of the first column's name.
    path.write_bytes("\ufeffuser_id,email,plan\nu1,u1@example.com,pro\n".encode())

    assert flatten(FileSource(path).read_chunks()) == [(1, "u1", "u1@example.com")]


def test_csv_extra_columns_are_ignored_and_short_rows_give_none(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("email,name,user_id\nu1@example.com,Ann,u1\nu2@example.com\n")

    assert flatten(FileSource(path).read_chunks()) == [
        (1, "u1", "u1@example.com"),
        (2, None, "u2@example.com"),
    ]


def test_jsonl_blank_lines_are_skipped_and_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "members.jsonl"
    path.write_text(
        '\n{"user_id": "u1", "email": "u1@example.com"}\n'
        "   \n\n"
        '{"user_id": 2, "email": null, "extra": true}\n'
    )

    assert flatten(FileSource(path).read_chunks()) == [
        (1, "u1", "u1@example.com"),
        (2, 2, None),
    ]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"user_id": "u1", "email": "u1@example.com"}\n{"user_id": \n', "line 2: invalid JSON"),
        (b'{"user_id": "u1", "email": "u1@example.com"}\n\n[1, 2]\n', "line 3: expected a JSON"),
        (b'{"user_id": "u1", "email": "caf\xe9@example.com"}\n', "not UTF-8 at line 1"),
        # Python refuses to read an integer this long: the line is named, not an internal error.
        (b'{"user_id": ' + b"1" * 5000 + b', "email": "a@b.co"}\n', "line 1: invalid JSON"),
    ],
    ids=["invalid-json", "not-an-object", "not-utf8", "too-long-an-integer"],
)
def test_broken_jsonl_names_the_file_and_line(
    tmp_path: Path, content: bytes, fragment: str
) -> None:
    path = tmp_path / "members.jsonl"
    path.write_bytes(content)

    with pytest.raises(SourceError) as info:
        flatten(FileSource(path).read_chunks())

    assert str(path) in str(info.value)
    assert fragment in str(info.value)


@pytest.mark.parametrize("read", ["rows", "batches"])
def test_not_utf8_after_many_rows_names_its_line(tmp_path: Path, read: str) -> None:
    path = tmp_path / "members.csv"
    good = "".join(f"u{n},u{n}@example.com\n" for n in range(50_000))
    path.write_bytes(b"user_id,email\n" + good.encode() + b"u9,caf\xe9@example.com\nu8,a@b.co\n")
    source = FileSource(path)
    reading = source.read_chunks(chunk_size=1000) if read == "rows" else source.batches()

    with pytest.raises(SourceError, match="not UTF-8 at line 50002: invalid continuation byte"):
        list(reading)


def test_first_bad_line_finds_a_byte_cut_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "members.csv"
    # "é" (two bytes) straddles the 1 MiB read boundary; the bad byte is two lines later.
    path.write_bytes(b"x" * (READ_BUFFER - 1) + "é".encode() + b"\nok\n\xff\n")

    assert first_bad_line(path) == 3
    path.write_bytes(b"fine\n\xc3")  # cut short at the end
    assert first_bad_line(path) == 2
    path.write_bytes(b"fine\n")
    assert first_bad_line(path) is None


# ---------------------------------------------------------------- SqlSource


def test_sql_source_reads_in_chunks_with_integer_ids(tmp_path: Path) -> None:
    url = sqlite_warehouse(tmp_path / "warehouse.db", [(n, f"u{n}@example.com") for n in range(7)])
    source = SqlSource(url, "SELECT email, user_id, 1 AS extra FROM users ORDER BY user_id", "wh")

    chunks = list(source.read_chunks(chunk_size=3))

    assert [len(c) for c in chunks] == [3, 3, 1]
    rows = flatten(iter(chunks))
    assert rows == [(n + 1, n, f"u{n}@example.com") for n in range(7)]
    assert all(type(user_id) is int for _, user_id, _ in rows)


def test_sql_source_missing_columns_names_what_it_got(tmp_path: Path) -> None:
    url = sqlite_warehouse(tmp_path / "warehouse.db")
    source = SqlSource(url, "SELECT user_id AS id, email AS mail FROM users", "warehouse")

    with pytest.raises(SourceError) as info:
        flatten(source.read_chunks())

    assert "missing user_id, email (got id, mail)" in str(info.value)
    assert str(info.value).startswith("warehouse: sqlite:///")


@pytest.mark.postgres
def test_sql_source_reads_postgresql(pg_warehouse: PgWarehouse) -> None:
    # Regression: the read-only SET ran inside the query's server-side cursor
    # (DECLARE ... CURSOR FOR SET ...), so every PostgreSQL source failed.
    source = SqlSource(pg_warehouse.url, "SELECT user_id, email FROM users ORDER BY 1", "pg")

    chunks = list(source.read_chunks(chunk_size=2))

    assert [len(c) for c in chunks] == [2, 1]
    assert flatten(iter(chunks)) == [(n + 1, u, e) for n, (u, e) in enumerate(USERS)]


# ---------------------------------------------------------------- read-only


WRITES = [
    pytest.param("DELETE FROM users RETURNING user_id, email", id="delete-returning"),
    pytest.param(
        "UPDATE users SET email = 'x@example.com' RETURNING user_id, email", id="update-returning"
    ),
    pytest.param("DROP TABLE users", id="drop-table"),
    pytest.param("INSERT INTO users VALUES (9, 'z@example.com')", id="insert"),
]


# Writes that start like a read: only the database's read-only transaction stops them.
SNEAKY_SQLITE = [
    pytest.param(
        "WITH x AS (SELECT 1) INSERT INTO users VALUES (9, 'z@example.com')", id="with-insert"
    ),
    pytest.param("-- a comment first\nDELETE FROM users RETURNING *", id="comment-then-delete"),
]


@pytest.mark.parametrize("query", [*WRITES, *SNEAKY_SQLITE])
def test_sqlite_warehouse_is_never_written(tmp_path: Path, query: str) -> None:
    path = tmp_path / "warehouse.db"
    url = sqlite_warehouse(path)

    with pytest.raises(SourceError) as info:
        flatten(SqlSource(url, query, "warehouse").read_chunks())

    assert str(info.value).startswith(f"warehouse: {url}: the query must be read-only")
    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT * FROM users ORDER BY 1").fetchall() == USERS


@pytest.mark.postgres
@pytest.mark.parametrize(
    "query",
    [
        *WRITES,
        pytest.param("SELECT user_id, email FROM purge()", id="function-that-deletes"),
        pytest.param(
            "WITH gone AS (DELETE FROM users RETURNING user_id, email) SELECT * FROM gone",
            id="data-modifying-with",
        ),
    ],
)
def test_postgresql_warehouse_is_never_written(pg_warehouse: PgWarehouse, query: str) -> None:
    with pytest.raises(SourceError) as info:
        flatten(SqlSource(pg_warehouse.url, query, "warehouse").read_chunks())

    message = str(info.value)
    assert message.startswith("warehouse: postgresql")
    # A bare write is refused before it is sent, anything sneakier by the read-only
    # transaction (or the server-side cursor); the message says why either way, never
    # "syntax error", which is what PostgreSQL answers a DELETE ... RETURNING in a cursor.
    assert "the query must be read-only" in message
    assert "syntax error" not in message
    assert pg_warehouse.rows() == USERS


def test_a_typo_is_reported_by_the_database_not_as_a_write(tmp_path: Path) -> None:
    url = sqlite_warehouse(tmp_path / "warehouse.db")
    with pytest.raises(SourceError) as info:
        flatten(SqlSource(url, "SELEC user_id, email FROM users", "warehouse").read_chunks())
    assert "query failed: " in str(info.value)
    assert "read-only" not in str(info.value)


@pytest.mark.postgres
def test_postgresql_read_only_is_what_stops_a_writing_function(
    pg_warehouse: PgWarehouse,
) -> None:
    source = SqlSource(pg_warehouse.url, "SELECT user_id, email FROM purge()", "warehouse")

    with pytest.raises(SourceError, match="cannot execute DELETE in a read-only transaction"):
        flatten(source.read_chunks())

    assert pg_warehouse.rows() == USERS


# ---------------------------------------------------------------- connection failures


def test_password_never_appears_in_a_connection_error() -> None:
    source = SqlSource(
        "postgresql://user:hunter2@127.0.0.1:1/nowhere", "SELECT user_id, email FROM t", "pg"
    )

    with pytest.raises(SourceError) as info:
        flatten(source.read_chunks())

    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)
    assert "hunter2" not in source.description


def test_unknown_dialect_is_a_source_error_without_the_password() -> None:
    # Regression: create_engine ran outside the try, so this escaped as NoSuchModuleError
    # and stopped the whole sync instead of failing one audience.
    source = SqlSource("nosuchdb://user:hunter2@db.internal/app", "SELECT 1", "warehouse")

    with pytest.raises(SourceError, match="nosuchdb") as info:
        flatten(source.read_chunks())

    assert "hunter2" not in str(info.value)


@pytest.mark.skipif(
    importlib.util.find_spec("MySQLdb") is not None, reason="the MySQL driver is installed here"
)
def test_missing_driver_is_a_source_error() -> None:
    source = SqlSource("mysql://user:hunter2@db.internal/app", "SELECT 1", "warehouse")

    with pytest.raises(SourceError, match="driver not installed") as info:
        flatten(source.read_chunks())

    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)


# ---------------------------------------------------------------- a SQL chunk checked whole

# Values a plain pair has, and values that take split_chunk's slow path for each reason it
# has: white space to trim, tabs and line breaks (the separators of split_plain's text),
# control characters, lengths at and past the bounds, invalid emails, and other types.
PAIR_USERS = st.one_of(
    st.sampled_from(["u1", "u2", "007", "x" * 255, "x" * 256, " u1", "u1 ", "a\tb", "a\nb",
                     "a\x00", "\u2028u", "", "u\r", "ü"]),
    st.text(max_size=6), st.integers(-5, 5), st.floats(allow_nan=True), st.none(),
)  # fmt: skip
PAIR_EMAILS = st.one_of(
    st.sampled_from(["a@b.co", "u1@example.com", "x@y.z" + "z" * 315, "x@y.z" + "z" * 316,
                     " a@b.co", "a@b.co\n", "a@b.co\tu2\tc@d.ef", "a@b", "a@@b.co", "a b@c.de",
                     "a@b.co\nu2\tc@d.ef"]),
    st.text(max_size=8), st.none(), st.integers(0, 3),
)  # fmt: skip


@given(st.lists(st.tuples(PAIR_USERS, PAIR_EMAILS), max_size=12))
@settings(max_examples=400)
def test_a_chunk_checked_whole_stages_what_row_by_row_does(pairs: list[tuple[Any, Any]]) -> None:
    whole = split_plain(pairs)
    good, bad = split_chunk([(n, u, e, None) for n, (u, e) in enumerate(pairs, 1)])
    if whole is not None:
        assert (whole, []) == (good, bad)
    # Checked whole exactly when every pair takes split_chunk's fast path as it stands.
    fast = all(
        type(u) is str
        and type(e) is str
        and _PLAIN_USER_ID.fullmatch(u)
        and len(e) <= MAX_EMAIL
        and EMAIL_PATTERN.fullmatch(e)
        for u, e in pairs
    )
    assert (whole is not None) == fast


def test_plain_sql_rows_are_checked_a_chunk_at_a_time(tmp_path: Path) -> None:
    rows = [(f"u{i}", f"u{i}@example.com") for i in range(12_000)]
    source = SqlSource(sqlite_warehouse(tmp_path / "wh.db", rows), "SELECT * FROM users", "wh")
    batches = list(source.batches())
    assert [b.rows for b in batches] == [5000, 5000, 2000]
    assert [row for b in batches for row in b.good] == rows
    assert split_plain(rows[:3]) == rows[:3]
    # One row to trim or to refuse sends its chunk row by row: the same rows, numbered.
    rows[7000] = (" u7000 ", "u7000@example.com")
    rows[9000] = ("u9000", "not an email")
    source = SqlSource(sqlite_warehouse(tmp_path / "wh2.db", rows), "SELECT * FROM users", "wh")
    batches = list(source.batches())
    assert [b.bad for b in batches] == [[], [(9001, "u9000", "not an email", "invalid email")], []]
    assert batches[1].good[2000] == ("u7000", "u7000@example.com")  # trimmed
