"""The row contract (docs/sources.md), held by a differential test: the same rows staged
through every source path give the identical snapshot (user_id → email, the first row of a
user winning) and the identical rejections (row number, reason), on either state store.

Each example draws the column types of ``user_id`` (text, bigint, numeric, float8, jsonb,
uuid, boolean) and ``email`` (text, jsonb), then rows of values of those types: Unicode white
space and control characters at either end and inside, big and fractional numbers, floats
about 2^53, NaN and ±Infinity, JSON strings, numbers, booleans, arrays and nulls, SQL NULLs,
and users repeated with other emails. Every path is handed the rows as it can hold them:

- a PostgreSQL table with columns of those types: read warehouse-native (PostgreSQL state
  only) and through Python (``SqlSource``, psycopg) — every example;
- JSONL: the value a Python reader of the table gets (NaN and ±Infinity as Python's json
  writes them). Not: a fractional numeric that a JSON float would round to a whole number;
- a SQLite table (``SqlSource``): text, 64-bit integers, floats, NULL. Not: NaN (SQLite
  stores NULL), booleans, JSON arrays and objects, numerics beyond 64 bits or rounding.
  Through Python, and on a SQLite state also attached (``Staging.stage_attached``);
- CSV: text only, and NULL as an empty field; a whole number as its digits (the id it
  canonicalises to). Not: any other number, boolean or JSON array, a non-text email, or a
  row whose fields are all empty or white space (such a line is no row in a CSV file);
- a Segment Engage export (one identify event per row): only rows whose user ids are all
  valid and distinct (the export keeps one state per user, and a bad userId fails the file).

A path that cannot hold every row of an example sits that example out (``hypothesis.event``
counts how often: ``--hypothesis-show-statistics``); the comparison is never loosened. The
expected outcome is the contract's own function (``rows.check_row`` on the values a Python
reader gets, the first valid row of a user winning), so the stores are held to one answer.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, create_engine, select, text
from sqlalchemy.pool import NullPool

from audience_sync.models import rejected_rows
from audience_sync.rows import WHITE_SPACE, canonical_user_id, check_row
from audience_sync.runs import open_run, utcnow
from audience_sync.sources import FileSource, Source, SqlSource
from audience_sync.stage import Snapshot, Staging
from tests.conftest import require_postgres

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
EXAMPLES = 1000 if LONG else 100

# Unicode White_Space, and characters that are not: C0 controls (\x1c-\x1f are white space to
# Python's str.strip()), DEL, C1 controls and format characters such as ZERO WIDTH SPACE.
WHITE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2003\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_WHITE = "\x01\x1c\x1d\x1e\x1f\x7f\x80\x9f\u200b\ufeff"
USER_CORES = [
    "u1", "u2", "U1", "v1", "7", "007", "-3", "42", "a b", "ü", "x" * 255, "x" * 256, "",
    "5f0c6d0e-8d5b-4a58-9a0e-0d1b8e3f2a61",
]  # fmt: skip
EMAIL_CORES = [
    "a@example.com", "b@example.com", "v@example.dev", "ü@ß.de", "a@b", "not an email",
    "a@@b.co", "a b@c.de", "x@y.z" + "z" * 315, "x@y.z" + "z" * 316, "",
]  # fmt: skip
# Any text a PostgreSQL column holds (no NUL, no lone surrogate), for the cores drawn anew.
ANY_TEXT = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=5
)
BIG = 2**53
NUMERICS = [
    "42", "42.0", "42.000", "42.5", "-0", "0.000001", "7", "1e20", "9007199254740993", "1e254",
    "-1e254", "1e255", "NaN", "Infinity", "-Infinity", "1.00000000000000001",
    "123456789012345678901234567890.5", "9007199254740993.5",
]  # fmt: skip
FLOATS = [
    0.0, -0.0, 7.0, 42.0, 42.5, BIG - 1.0, float(BIG), -float(BIG), BIG + 2.0,
    1.2345678901234568e20, 1e-320, math.nan, math.inf, -math.inf, 1e300, 4503599627370495.5,
]  # fmt: skip
JSON_NUMBERS = [
    "7", "-0", "42.0", "42.5", "-7.000", "9007199254740992.0", "9007199254740993.0",
    "4503599627370496.5", "0.99999999999999999999", "100000000000000000000.0",
    "100000000000000000000", "1" + "0" * 300,
]  # fmt: skip


def edge() -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.text(st.sampled_from(WHITE), min_size=1, max_size=2),
        st.sampled_from(NOT_WHITE),
    )


@st.composite
def decorated(draw: st.DrawFn, cores: st.SearchStrategy[str]) -> str:
    """A core value with white space or other characters before, after or inside it."""
    core = draw(cores)
    if core and draw(st.integers(0, 5)) == 0:
        cut = draw(st.integers(0, len(core)))
        core = core[:cut] + draw(st.sampled_from(WHITE + NOT_WHITE)) + core[cut:]
    return draw(edge()) + core + draw(edge())


def nullable(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), values, values, values)


TEXT_IDS = decorated(st.one_of(st.sampled_from(USER_CORES), ANY_TEXT))
TEXT_EMAILS = decorated(
    st.one_of(
        st.sampled_from(EMAIL_CORES),
        st.builds("{}@{}.{}".format, ANY_TEXT, ANY_TEXT, ANY_TEXT),
    )
)
USER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "text": nullable(TEXT_IDS),
    "bigint": nullable(
        st.one_of(
            st.sampled_from([0, 7, -3, 42, BIG, BIG + 1, 2**63 - 1, -(2**63)]),
            st.integers(-10, 50),
        )
    ),
    "numeric": nullable(
        st.one_of(
            st.sampled_from([Decimal(n) for n in NUMERICS]),
            st.decimals(-(10**6), 10**6, allow_nan=False, places=2),
        )
    ),
    "double precision": nullable(st.one_of(st.sampled_from(FLOATS), st.floats())),
    "jsonb": nullable(
        st.one_of(
            TEXT_IDS.map(json.dumps),
            st.sampled_from(JSON_NUMBERS),
            st.integers(-(10**20), 10**20).map(str),
            st.sampled_from(["true", "false", "null", "[1]", '{"a": 1}']),
        )
    ),
    "uuid": nullable(
        st.one_of(st.uuids(), st.just(uuid.UUID("5f0c6d0e-8d5b-4a58-9a0e-0d1b8e3f2a61")))
    ),
    "boolean": nullable(st.booleans()),
}
EMAIL_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "text": nullable(TEXT_EMAILS),
    "jsonb": nullable(
        st.one_of(
            TEXT_EMAILS.map(json.dumps),
            st.sampled_from(["5", "1.5", "null", "true", '["a@example.com"]']),
        )
    ),
}


@dataclass(frozen=True)
class Rows:
    """An example: the columns' SQL types and the rows' values in them (jsonb as its text)."""

    user_type: str
    email_type: str
    rows: list[tuple[Any, Any]]


@st.composite
def examples(draw: st.DrawFn) -> Rows:
    user_type = draw(st.sampled_from(sorted(USER_VALUES)))
    email_type = draw(st.sampled_from(sorted(EMAIL_VALUES)))
    users = draw(st.lists(USER_VALUES[user_type], min_size=1, max_size=5))
    emails = EMAIL_VALUES[email_type]
    if draw(st.booleans()):  # a row per user: an export Engage could have made
        rows = [(user, draw(emails)) for user in {repr(u): u for u in users}.values()]
    else:  # users repeated, with other emails
        rows = draw(st.lists(st.tuples(st.sampled_from(users), emails), max_size=10))
    return Rows(user_type, email_type, rows)


def python_value(sql_type: str, value: Any) -> Any:
    """What psycopg gives a Python reader for ``value`` in a column of ``sql_type``."""
    if value is not None and sql_type == "jsonb":
        return json.loads(value)
    return value


NOPE = object()  # a value the path cannot hold


@dataclass(frozen=True)
class Outcome:
    source_rows: int
    members: dict[str, str]
    rejected: list[tuple[int, str]]


def expected(rows: list[tuple[Any, Any]]) -> Outcome:
    """The contract's answer: each row checked by ``rows.check_row``, the first valid row of
    a user winning."""
    members: dict[str, str] = {}
    rejected = []
    for number, (user, email) in enumerate(rows, start=1):
        checked = check_row(user, email)
        if isinstance(checked, str):
            rejected.append((number, checked))
        else:
            members.setdefault(*checked)
    return Outcome(len(rows), members, rejected)


def outcome_of(connection: Connection, snapshot: Snapshot) -> Outcome:
    """What staging ``snapshot`` gave: its members and its run's rejections."""
    with connection.begin():
        members = connection.execute(select(snapshot.table.c.user_id, snapshot.table.c.email)).all()
        refused = connection.execute(
            select(rejected_rows.c.row_number, rejected_rows.c.reason)
            .where(rejected_rows.c.run_id == snapshot.run_id)
            .order_by(rejected_rows.c.row_number)
        ).all()
    return Outcome(snapshot.source_rows, dict(members), [(n, r) for n, r in refused])


def write_sqlite(path: Path, rows: list[tuple[Any, Any]], table: str = "given") -> str:
    """``rows`` as a SQLite warehouse table (their order kept in ``pos``); its query."""
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as database:
        database.execute(f"CREATE TABLE {table} (pos INTEGER, user_id, email)")
        database.executemany(
            f"INSERT INTO {table} VALUES (?, ?, ?)",
            [(pos, user, email) for pos, (user, email) in enumerate(rows)],
        )
    database.close()
    return f"SELECT user_id, email FROM {table} ORDER BY pos"


def as_json(value: Any) -> Any:
    """A Python reader's value as a JSON file holds it (json.loads gives it back)."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            return float(value)
        if value == value.to_integral_value():
            return int(value)
        return NOPE if float(value).is_integer() else float(value)
    return value


def as_sqlite(value: Any) -> Any:
    value = as_json(value)
    if isinstance(value, bool | list | dict) or (isinstance(value, float) and math.isnan(value)):
        return NOPE
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return NOPE
    return value


def as_csv_id(value: Any) -> Any:
    value = as_json(value)
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, bool):
        return NOPE
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < BIG:
        return str(int(value))
    return NOPE


def as_csv_email(value: Any) -> Any:
    return (value or "") if value is None or isinstance(value, str) else NOPE


def held(
    rows: list[tuple[Any, Any]],
    hold: Callable[[Any], Any],
    hold_email: Callable[[Any], Any] = as_json,
) -> list[tuple[Any, Any]] | None:
    """The rows as a path holds them, or None when it cannot hold one of them."""
    converted = [(hold(user), hold_email(email)) for user, email in rows]
    if any(NOPE in row for row in converted):
        return None
    return converted


class Paths:
    """Every source path, staged on one state connection."""

    def __init__(self, engine: Engine, connection: Connection, folder: Path, admin: str) -> None:
        self.engine = engine
        self.connection = connection
        self.folder = folder
        self.admin = admin
        self.schema = f"ct_{uuid.uuid4().hex[:10]}"
        self.warehouse = create_engine(admin, poolclass=NullPool)
        with self.warehouse.begin() as warehouse:
            warehouse.execute(text(f'CREATE SCHEMA "{self.schema}"'))
        self.sqlite = folder / "source.db"

    def close(self) -> None:
        with self.warehouse.begin() as warehouse:
            warehouse.execute(text(f'DROP SCHEMA "{self.schema}" CASCADE'))
        self.warehouse.dispose()

    def outcomes(self, example: Rows) -> Iterator[tuple[str, Outcome]]:
        """Each path's outcome of the example's rows, if the path can hold them."""
        staging = Staging(self.connection)
        try:
            query = self._fill_postgresql(example)
            postgres = self.connection.dialect.name == "postgresql"
            if postgres:
                yield "native", self._stage(staging, SqlSource(self.admin, query, "state"), True)
            yield "postgresql", self._stage(staging, SqlSource(self.admin, query, "warehouse"))
            rows = [
                (python_value(example.user_type, user), python_value(example.email_type, email))
                for user, email in example.rows
            ]
            sources: dict[str, Callable[[list[tuple[Any, Any]]], Source | None]] = {
                "sqlite": self._sqlite,
                "csv": self._csv,
                "jsonl": self._jsonl,
                "engage": self._engage,
            }
            for name, make in sources.items():
                source = make(rows)
                if source is None:
                    event(f"{name} sits out")
                    continue
                yield name, self._stage(staging, source)
                if name == "sqlite" and not postgres:
                    yield "sqlite-attached", self._stage(staging, source, attached=self.sqlite)
        finally:
            staging.drop()

    def _stage(
        self, staging: Staging, source: Any, native: bool = False, attached: Path | None = None
    ) -> Outcome:
        run = open_run(self.engine, "vip", "VIP", source.description, "dry-run", utcnow())
        if native:
            snapshot = staging.stage_query(run, source)
        elif attached is not None:
            staged = staging.stage_attached(run, source, attached)
            assert staged is not None, "the attached path declined"
            snapshot = staged
        else:
            snapshot = staging.stage(run, source)
        assert snapshot.staged_in == ("database" if native or attached else "python")
        return outcome_of(self.connection, snapshot)

    def _fill_postgresql(self, example: Rows) -> str:
        table = f'"{self.schema}".given'
        with self.warehouse.begin() as warehouse:
            warehouse.execute(text(f"DROP TABLE IF EXISTS {table}"))
            warehouse.execute(
                text(
                    f"CREATE TABLE {table} (pos integer, user_id {example.user_type}, "
                    f"email {example.email_type})"
                )
            )
            if example.rows:
                warehouse.execute(
                    text(
                        f"INSERT INTO {table} VALUES (:pos, CAST(:user AS {example.user_type}), "
                        f"CAST(:email AS {example.email_type}))"
                    ),
                    [
                        {"pos": pos, "user": user, "email": email}
                        for pos, (user, email) in enumerate(example.rows)
                    ],
                )
        return f"SELECT user_id, email FROM {table} ORDER BY pos"

    def _sqlite(self, rows: list[tuple[Any, Any]]) -> Source | None:
        converted = held(rows, as_sqlite, as_sqlite)
        if converted is None:
            return None
        query = write_sqlite(self.sqlite, converted)
        return SqlSource(f"sqlite:///{self.sqlite}", query, "sqlite")

    def _csv(self, rows: list[tuple[Any, Any]]) -> Source | None:
        converted = held(rows, as_csv_id, as_csv_email)
        blank = any(not f"{user}{email}".strip(WHITE) for user, email in converted or [])
        if converted is None or blank:
            return None
        path = self.folder / "members.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["user_id", "email"])
            writer.writerows(converted)
        return FileSource(path)

    def _jsonl(self, rows: list[tuple[Any, Any]]) -> Source | None:
        converted = held(rows, as_json)
        if converted is None:
            return None
        path = self.folder / "members.jsonl"
        lines = [json.dumps({"user_id": user, "email": email}) for user, email in converted]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return FileSource(path)

    def _engage(self, rows: list[tuple[Any, Any]]) -> Source | None:
        converted = held(rows, as_json)
        if converted is None:
            return None
        try:
            ids = [canonical_user_id(user) for user, _ in converted]
        except ValueError:
            return None  # a bad userId fails the whole export
        if len(set(ids)) < len(ids):
            return None  # the export holds one state per user
        personas = {"computation_class": "audience", "computation_key": "vip"}
        lines = [
            json.dumps(
                {
                    "type": "identify",
                    "userId": user,
                    "traits": {"vip": True, "email": email},
                    "context": {"personas": personas},
                }
            )
            for user, email in converted
        ]
        path = self.folder / "engage.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return FileSource(path, "engage", key="vip")


@pytest.fixture
def paths(engine: Engine, tmp_path: Path) -> Iterator[Paths]:
    admin = require_postgres()  # the typed source table lives there, whatever the store
    with engine.connect() as connection:
        paths = Paths(engine, connection, tmp_path, admin)
        try:
            yield paths
        finally:
            paths.close()


ISSUE_22 = [  # the rows that staged differently natively and through Python
    Rows(
        "text",
        "text",
        [
            ("\xa0t1", "t1@example.com"),
            ("t2", "\u3000t2@example.com"),
            ("\u2003t3\u2003", "t3@example.com\u2028"),
            ("us\x1f", "u@example.com"),
            ("t5", "t5@example.com\x1f"),
        ],
    ),
    Rows(
        "double precision",
        "text",
        [
            (1.2345678901234568e20, "f@example.com"),
            (math.nan, "n@example.com"),
            (math.inf, "i@example.com"),
        ],
    ),
    Rows("jsonb", "text", [('"j1"', "j1@example.com"), ("7", "j2@example.com")]),
]


@pytest.mark.postgres
@pytest.mark.timeout(3600 if LONG else 300)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(example=examples())
@example(example=ISSUE_22[0])
@example(example=ISSUE_22[1])
@example(example=ISSUE_22[2])
def test_every_source_path_stages_the_same_rows_alike(paths: Paths, example: Rows) -> None:
    want = expected(
        [
            (python_value(example.user_type, u), python_value(example.email_type, e))
            for u, e in example.rows
        ]
    )
    for path, outcome in paths.outcomes(example):
        assert outcome == want, path


def test_white_space_is_unicode_white_space() -> None:
    # str.isspace() is White_Space plus the separators \x1c-\x1f (control characters).
    for code in range(sys.maxunicode + 1):
        character = chr(code)
        wanted = character.isspace() and not 0x1C <= code <= 0x1F
        assert (character in WHITE_SPACE) == wanted, hex(code)
