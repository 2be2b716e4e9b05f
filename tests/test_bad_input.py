"""Bad input gets a clear error, and nothing is lost: bad config stops the CLI with exit 2,
a broken source fails (or rejects rows) without ever sending a ``false``."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from audience_sync.cli import run_cli
from audience_sync.fakegist import FakeGist
from audience_sync.models import memberships, rejected_rows
from audience_sync.sync import RunResult, run_once
from tests.conftest import API_KEY, Workspace

# ---------------------------------------------------------------- bad config

GIST = '[gist]\napi_key = "${GIST_API_KEY}"\n'
AUDIENCE = '[[audiences]]\nname = "Newsletter Signups"\nfile = "members.jsonl"\n'
WAREHOUSE = '[sources.warehouse]\nurl = "sqlite:///warehouse.db"\n'


@dataclass(frozen=True)
class BadConfig:
    toml: str | bytes | None  # None: the config file does not exist
    fragments: Sequence[str]
    secret: str | None = None  # must not appear in the error


CONFIG_CASES = [
    pytest.param(BadConfig('colour = "red"\n' + GIST + AUDIENCE, ["colour: unknown key"]),
                 id="unknown-top-level-key"),
    pytest.param(BadConfig(GIST + AUDIENCE + 'colour = "red"\n',
                           ["audiences[0] ('Newsletter Signups').colour: unknown key"]),
                 id="unknown-audience-key"),
    pytest.param(BadConfig(GIST + "retries = 3\n" + AUDIENCE, ["gist.retries: unknown key"]),
                 id="unknown-gist-key"),
    pytest.param(BadConfig(GIST + 'max_concurrency = "many"\n' + AUDIENCE,
                           ["gist.max_concurrency", "valid integer"]),
                 id="wrong-type"),
    pytest.param(BadConfig(GIST + AUDIENCE + "mass_exit_threshold = 2\n",
                           ["mass_exit_threshold", "less than or equal to 1"]),
                 id="out-of-range"),
    pytest.param(BadConfig('[gist]\nbase_url = "http://127.0.0.1:1"\n' + AUDIENCE,
                           ["gist.api_key: Field required"]),
                 id="missing-api-key"),
    pytest.param(BadConfig(GIST, ["at least one [[audiences]] or [[traits]]"]), id="no-audiences"),
    pytest.param(BadConfig('audiences = ["vip"]\n' + GIST, ["audiences[0]", "valid dictionary"]),
                 id="audience-not-a-table"),
    pytest.param(BadConfig(GIST + '[[audiences]]\nname = "VIP"\nsource = "warehouse"\n'
                           'query = "SELECT user_id, email FROM users"\n',
                           ["source 'warehouse' is not defined under [sources]"]),
                 id="missing-source"),
    pytest.param(BadConfig(GIST + WAREHOUSE + AUDIENCE + 'source = "warehouse"\n'
                           'query = "SELECT user_id, email FROM users"\n',
                           ["audiences[0]", "not both"]),
                 id="query-and-file"),
    pytest.param(BadConfig(GIST + WAREHOUSE + '[[audiences]]\nname = "VIP"\n'
                           'source = "warehouse"\n', ["audiences[0] ('VIP')", "go together"]),
                 id="source-without-query"),
    pytest.param(BadConfig(GIST + AUDIENCE + 'schedule = "every tuesday"\n',
                           ["schedule 'every tuesday' is not a cron expression"]),
                 id="invalid-cron"),
    pytest.param(BadConfig(GIST + AUDIENCE + AUDIENCE.replace("Newsletter Signups",
                                                             "newsletter-signups"),
                           ["'Newsletter Signups'", "'newsletter-signups'",
                            "'newsletter_signups'"]),
                 id="key-collision"),
    pytest.param(BadConfig(GIST + AUDIENCE.replace("Newsletter Signups", "顧客"),
                           ["'顧客'", "empty property key", "`key`"]),
                 id="empty-key"),
    pytest.param(BadConfig(GIST + AUDIENCE + 'key = "Newsletter!"\n', ["must match"]),
                 id="invalid-explicit-key"),
    pytest.param(BadConfig('[gist]\napi_key = "${NOPE_NOT_SET}"\n' + AUDIENCE,
                           ["gist.api_key", "${NOPE_NOT_SET} is not set"]),
                 id="missing-env-var"),
    pytest.param(BadConfig(GIST + AUDIENCE.replace("members.jsonl", "members.txt"),
                           ["audiences[0] ('Newsletter Signups')", "'members.txt'",
                            "set `format` to csv, jsonl or engage"]),
                 id="unknown-suffix-asks-for-format"),
    pytest.param(BadConfig(GIST.replace("[gist]\n", '[gist]\nbase_url = "api.getgist.com"\n')
                           + AUDIENCE, ["gist.base_url", "'api.getgist.com'", "http(s) URL"]),
                 id="base-url-without-scheme"),
    pytest.param(BadConfig(GIST.replace("[gist]\n", '[gist]\nbase_url = "ftp://gist.example"\n')
                           + AUDIENCE, ["gist.base_url", "'ftp://gist.example'"]),
                 id="base-url-wrong-scheme"),
    pytest.param(BadConfig('[state]\nurl = "mysql://u:hunter2@db/state"\n' + GIST + AUDIENCE,
                           ["state", "SQLite or PostgreSQL, not mysql"], secret="hunter2"),
                 id="mysql-state"),
    pytest.param(BadConfig('[state]\nschema = "sync"\n' + GIST + AUDIENCE,
                           ["state", "`schema` applies to a PostgreSQL state only"]),
                 id="schema-on-sqlite"),
    pytest.param(BadConfig('[state]\nurl = "postgresql://u@h/db"\nschema = "Sync; DROP"\n'
                           + GIST + AUDIENCE, ["state", "must be a lowercase name"]),
                 id="schema-not-a-name"),
    pytest.param(BadConfig(GIST + '[sources.warehouse]\nurl = "::not a url::"\n' + AUDIENCE,
                           ["sources.warehouse.url", "not a SQLAlchemy URL"]),
                 id="unparseable-url"),
    pytest.param(BadConfig(GIST + '[sources.warehouse]\nurl = "postgresql://u:hunter2@h:port/db"\n'
                           + AUDIENCE, ["sources.warehouse.url", "not a SQLAlchemy URL"],
                           secret="hunter2"),
                 id="bad-port-url-with-password"),
    pytest.param(BadConfig('[state]\nurl = "postgresql://u:hunter2@h:port/db"\n' + GIST + AUDIENCE,
                           ["state.url", "not a SQLAlchemy URL"], secret="hunter2"),
                 id="bad-state-url-with-password"),
    pytest.param(BadConfig(None, ["config file not found"]), id="no-config-file"),
    pytest.param(BadConfig("[gist\napi_key = 1\n", ["invalid TOML", "line 1"]),
                 id="invalid-toml"),
    pytest.param(BadConfig(b'[gist]\napi_key = "caf\xe9"\n', ["cannot read config file"]),
                 id="config-not-utf8"),
]  # fmt: skip


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_names_the_file_and_the_problem(
    case: BadConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    (tmp_path / "members.jsonl").write_text('{"user_id": "u1", "email": "u1@example.com"}\n')
    (tmp_path / "folder").mkdir()
    path = tmp_path / "audience_sync.toml"
    if isinstance(case.toml, bytes):
        path.write_bytes(case.toml)
    elif case.toml is not None:
        path.write_text(case.toml, encoding="utf-8")

    code = run_cli(["run", "--config", str(path)])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert str(path) in err
    for fragment in case.fragments:
        assert fragment in err
    if case.secret is not None:
        assert case.secret not in err
    # A config error stops before the state database is even opened.
    assert not (tmp_path / "audience_sync.db").exists()


# ---------------------------------------------------------------- bad source data

NAME = "Order Completed Last 30days"
KEY = "order_completed_last_30days"
GOOD: list[tuple[Any, Any]] = [(f"u{n}", f"u{n}@example.com") for n in range(5)]
GOOD_USERS = {u for u, _ in GOOD}
GOOD_QUERY = "SELECT user_id, email FROM users"
HUGE = "x" * 1_000_000


class Audience:
    """One audience over a JSONL file, a CSV file or a SQLite warehouse, rewritten at will."""

    def __init__(self, workspace: Workspace, kind: str) -> None:
        self.workspace = workspace
        self.kind = kind
        if kind == "jsonl":
            self.path = workspace.add_file_audience(NAME)
        elif kind == "csv":
            self.path = workspace.root / "members.csv"
            self.path.write_text("user_id,email\n")
            workspace.audiences.append({"name": NAME, "file": self.path.name})
            workspace.write_config()
        else:
            self.path = workspace.root / "warehouse.db"
            with closing(sqlite3.connect(self.path)) as connection:
                connection.execute("CREATE TABLE users (user_id TEXT, email TEXT)")
                connection.commit()
            workspace.add_sql_audience(NAME, f"sqlite:///{self.path}", GOOD_QUERY)

    def write(self, rows: Sequence[tuple[Any, Any]]) -> None:
        if self.kind == "jsonl":
            lines = [json.dumps({"user_id": u, "email": e}) for u, e in rows]
            self.path.write_text("".join(f"{line}\n" for line in lines))
        elif self.kind == "csv":
            cells = ["" if v is None else str(v) for row in rows for v in row]
            lines = [",".join(cells[i : i + 2]) for i in range(0, len(cells), 2)]
            self.path.write_text("user_id,email\n" + "".join(f"{line}\n" for line in lines))
        else:
            with closing(sqlite3.connect(self.path)) as connection:
                connection.execute("DELETE FROM users")
                connection.executemany("INSERT INTO users VALUES (?, ?)", rows)
                connection.commit()

    def write_bytes(self, content: bytes) -> None:
        self.path.write_bytes(content)

    def set_query(self, query: str) -> None:
        self.workspace.audiences[0]["query"] = query
        self.workspace.write_config()

    def restore(self) -> None:
        self.write(GOOD)
        if self.kind == "sql":
            self.set_query(GOOD_QUERY)


@dataclass(frozen=True)
class BadSource:
    kind: str
    spoil: Callable[[Audience], None]
    status: str  # how the bad run ends
    fragments: Sequence[str] = ()  # in the run's error
    reasons: Sequence[str] = ()  # rejected rows' reasons, in row order
    entered: set[str] = field(default_factory=set)  # legitimately new members


def _rows(*extra: tuple[Any, Any]) -> Callable[[Audience], None]:
    return lambda audience: audience.write([*GOOD, *extra])


def _query(query: str) -> Callable[[Audience], None]:
    return lambda audience: audience.set_query(query)


def _bytes(content: bytes) -> Callable[[Audience], None]:
    return lambda audience: audience.write_bytes(content)


def _good_jsonl_then(line: bytes) -> bytes:
    good = b"".join(json.dumps({"user_id": u, "email": e}).encode() + b"\n" for u, e in GOOD)
    return good + line


NULLS = ((None, "x@example.com"), ("u8", None))
NULL_REASONS = ("missing user_id", "missing email")
HUGE_REASON = ("user_id longer than 255 characters",)
DUPLICATES = [("u9", "u9@example.com")] * 10_000

SOURCE_CASES = [
    pytest.param(BadSource("sql", _rows(*NULLS), "succeeded", reasons=NULL_REASONS),
                 id="sql-null-values"),
    pytest.param(BadSource("jsonl", _rows(*NULLS), "succeeded", reasons=NULL_REASONS),
                 id="jsonl-null-values"),
    pytest.param(BadSource("csv", _rows(*NULLS), "succeeded", reasons=NULL_REASONS),
                 id="csv-empty-values"),
    pytest.param(BadSource("sql", _query("SELECT user_id AS id, email AS mail FROM users"),
                           "failed", ["missing user_id, email (got id, mail)"]),
                 id="sql-wrong-columns"),
    pytest.param(BadSource("sql", _query("SELEC user_id, email FROM users"), "failed",
                           ["query failed", "syntax error"]),
                 id="sql-syntax-error"),
    pytest.param(BadSource("sql", _query("SELECT user_id, email FROM customers"), "failed",
                           ["query failed", "no such table: customers"]),
                 id="sql-missing-table"),
    pytest.param(BadSource("csv", _bytes(b"user_id,email\n1,caf\xe9@example.com\n"), "failed",
                           ["members.csv", "not UTF-8"]),
                 id="csv-not-utf8"),
    pytest.param(BadSource("jsonl", _bytes(_good_jsonl_then(b'{"user_id": "u\xff"}\n')),
                           "failed", ["0.jsonl", "not UTF-8"]),
                 id="jsonl-not-utf8"),
    pytest.param(BadSource("csv", _bytes(b"u0,u0@example.com\nu1,u1@example.com\n"), "failed",
                           ["members.csv", "header must name user_id and email"]),
                 id="csv-no-header"),
    pytest.param(BadSource("csv", _rows((HUGE, "big@example.com")), "succeeded",
                           reasons=HUGE_REASON),
                 id="csv-huge-field"),
    pytest.param(BadSource("jsonl", _rows((HUGE, "big@example.com")), "succeeded",
                           reasons=HUGE_REASON),
                 id="jsonl-huge-field"),
    pytest.param(BadSource("jsonl", _rows(*DUPLICATES), "succeeded", entered={"u9"}),
                 id="jsonl-10k-duplicates"),
    pytest.param(BadSource("sql", _rows(*DUPLICATES), "succeeded", entered={"u9"}),
                 id="sql-10k-duplicates"),
    pytest.param(BadSource("sql", _query(GOOD_QUERY + " WHERE 1 = 0"), "guarded",
                           ["would remove 5 of 5 members", "nothing was sent"]),
                 id="sql-zero-rows"),
    pytest.param(BadSource("jsonl", _bytes(b""), "guarded", ["would remove 5 of 5"]),
                 id="jsonl-empty-file"),
    pytest.param(BadSource("csv", _bytes(b"user_id,email\n"), "guarded", ["would remove 5 of 5"]),
                 id="csv-header-only"),
    pytest.param(BadSource("jsonl", _bytes(_good_jsonl_then(b'{"user_id": "u9", \n')), "failed",
                           ["0.jsonl", "line 6", "invalid JSON"]),
                 id="jsonl-invalid-json"),
    pytest.param(BadSource("jsonl", _bytes(_good_jsonl_then(b'\n["u9", "u9@example.com"]\n')),
                           "failed", ["line 7", "expected a JSON object"]),
                 id="jsonl-not-an-object"),
]  # fmt: skip


def sync(workspace: Workspace, engine: Engine) -> RunResult:
    [result] = run_once(workspace.settings(), engine)
    return result


def acknowledged(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(
            connection.scalars(
                select(memberships.c.user_id).where(memberships.c.audience_key == KEY)
            )
        )


def sent(gist: FakeGist) -> list[tuple[str, Any]]:
    """(user_id, value) of every audience property Gist was sent since the log was cleared."""
    return [
        (r.body["user_id"], r.body["custom_properties"][KEY]) for r in gist.requests("/contacts")
    ]


def rejected(engine: Engine, run_id: int | None) -> list[tuple[int, str]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(rejected_rows.c.row_number, rejected_rows.c.reason)
            .where(rejected_rows.c.run_id == run_id)
            .order_by(rejected_rows.c.row_number)
        )
        return [(row.row_number, row.reason) for row in rows]


@pytest.mark.parametrize("case", SOURCE_CASES)
def test_broken_source_never_sends_false_and_loses_nothing(
    case: BadSource, workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    audience = Audience(workspace, case.kind)
    audience.write(GOOD)
    first = sync(workspace, engine)
    assert (first.status, first.entered) == ("succeeded", len(GOOD))
    assert acknowledged(engine) == GOOD_USERS
    gist.clear_log()

    case.spoil(audience)
    bad = sync(workspace, engine)

    assert bad.status == case.status, bad.error
    for fragment in case.fragments:
        assert fragment in (bad.error or "")
    assert [value for _, value in sent(gist) if value is not True] == []  # never a false
    assert sorted(sent(gist)) == sorted((user, True) for user in case.entered)  # one each
    assert acknowledged(engine) == GOOD_USERS | case.entered
    assert bad.exited == (0 if case.status != "guarded" else len(GOOD))
    reasons = [reason for _, reason in rejected(engine, bad.run_id)]
    assert reasons == list(case.reasons)
    assert bad.rejected == len(case.reasons)
    if case.entered:
        assert bad.members == len(GOOD) + len(case.entered)

    gist.clear_log()
    audience.restore()
    repaired = sync(workspace, engine)

    assert (repaired.status, repaired.error) == ("succeeded", None)
    assert sorted(sent(gist)) == sorted((user, False) for user in case.entered)
    assert acknowledged(engine) == GOOD_USERS
    assert {u for u, v in gist.properties(KEY).items() if v is True} == GOOD_USERS


def test_rejected_rows_keep_their_row_numbers(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    audience = Audience(workspace, "jsonl")
    audience.write([*GOOD[:2], (None, "x@example.com"), GOOD[2], (HUGE, "big@example.com")])

    result = sync(workspace, engine)

    assert (result.status, result.members, result.rejected) == ("succeeded", 3, 2)
    assert rejected(engine, result.run_id) == [
        (3, "missing user_id"),
        (5, "user_id longer than 255 characters"),
    ]


def test_member_whose_row_turns_bad_is_not_sent_false(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """A member still in the source, whose row is now unusable, has not left the audience."""
    audience = Audience(workspace, "sql")
    audience.write(GOOD)
    sync(workspace, engine)
    gist.clear_log()
    audience.write([*GOOD[:4], ("u4", None)])  # u4 is still there, but its email went NULL

    result = sync(workspace, engine)

    assert result.rejected == 1
    assert [value for _, value in sent(gist) if value is not True] == []
    assert acknowledged(engine) == GOOD_USERS


def test_nul_byte_in_user_id_is_rejected_with_a_reason(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """A NUL in an id is a broken row, not a member: PostgreSQL cannot even stage it."""
    audience = Audience(workspace, "jsonl")
    audience.write([*GOOD, ("u9\x00x", "u9@example.com")])

    result = sync(workspace, engine)

    assert (result.status, result.members, result.rejected) == ("succeeded", 5, 1)
    assert acknowledged(engine) == GOOD_USERS
