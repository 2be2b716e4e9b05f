"""``state.schema``: the PostgreSQL state in a schema of its own, created by ``db upgrade``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from audience_sync.cli import run_cli
from audience_sync.fakegist import FakeGist
from tests.conftest import API_KEY, require_postgres, write_members


@pytest.fixture
def schema() -> Iterator[tuple[str, str]]:
    """(admin URL, a schema name nobody uses); the schema is dropped afterwards."""
    admin = require_postgres()
    name = f"state_{uuid.uuid4().hex[:10]}"
    yield admin, name
    engine = create_engine(admin, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    engine.dispose()


@pytest.mark.postgres
def test_state_schema_is_created_by_db_upgrade_and_used_by_every_command(
    schema: tuple[str, str],
    tmp_path: Path,
    gist: FakeGist,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin, name = schema
    write_members(tmp_path / "members.jsonl", [1, 2])
    config = tmp_path / "audience_sync.toml"
    config.write_text(
        f'[state]\nurl = "{admin}"\nschema = "{name}"\n'
        f'[gist]\napi_key = "${{GIST_API_KEY}}"\nbase_url = "{gist.url}"\n'
        '[[audiences]]\nname = "Buyers"\nfile = "members.jsonl"\n'
    )
    monkeypatch.setenv("GIST_API_KEY", API_KEY)

    def cli(*args: str) -> tuple[int, str, str]:
        code = run_cli([*args, "--config", str(config)])
        out, err = capsys.readouterr()
        return code, out, err

    code, _, err = cli("run")
    assert code == 2
    assert "audience-sync db upgrade" in err  # a shared store is migrated only on purpose
    assert "or a `run`" not in err  # which would not migrate it either

    assert cli("db", "upgrade")[0] == 0
    assert cli("run")[0] == 0
    assert set(gist.contacts()) == {"u1", "u2"}
    code, out, _ = cli("history")
    assert code == 0
    assert "buyers" in out

    engine = create_engine(admin, poolclass=NullPool)
    with engine.connect() as connection:
        tables = set(
            connection.scalars(
                text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                {"s": name},
            )
        )
        members = connection.scalar(text(f'SELECT count(*) FROM "{name}".memberships'))
    engine.dispose()
    assert {"alembic_version", "sync_runs", "memberships", "member_changes"} <= tables
    assert members == 2  # what Gist acknowledged is kept in that schema


@pytest.fixture
def database() -> Iterator[str]:
    """The URL of a database of its own, dropped afterwards: its default search_path
    (``"$user", public``) is the one warehouse-native queries must see."""
    admin = require_postgres()
    name = f"db_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.mark.postgres
def test_native_queries_run_on_the_default_search_path_not_state_schema(
    database: str,
    tmp_path: Path,
    gist: FakeGist,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    engine = create_engine(database, poolclass=NullPool)
    with engine.begin() as connection:
        for table, users in (("contacts", ["c1", "c2"]), ("vip_users", ["s1"])):
            connection.execute(text(f"CREATE TABLE public.{table} (user_id text, email text)"))
            for user in users:
                connection.execute(
                    text(f"INSERT INTO public.{table} VALUES (:u, :u || '@example.com')"),
                    {"u": user},
                )
    config = tmp_path / "audience_sync.toml"
    config.write_text(
        f'[state]\nurl = "{database}"\nschema = "rv_state"\n'
        f'[gist]\napi_key = "${{GIST_API_KEY}}"\nbase_url = "{gist.url}"\n'
        # `contacts` is also a state table (rv_state.contacts): the query must not see it.
        '[[audiences]]\nname = "Everyone"\nsource = "state"\n'
        'query = "SELECT user_id, email FROM contacts"\n'
        '[[audiences]]\nname = "VIP"\nsource = "state"\n'
        'query = "SELECT user_id, email FROM vip_users"\n'
    )
    monkeypatch.setenv("GIST_API_KEY", API_KEY)

    assert run_cli(["db", "upgrade", "--config", str(config)]) == 0
    capsys.readouterr()
    for _ in range(2):  # the second run: rv_state.contacts holds what Gist acknowledged
        code = run_cli(["run", "--json", "--config", str(config)])
        runs = json.loads(capsys.readouterr().out)
        assert code == 0, runs
        assert {r["audience_key"]: (r["status"], r["staged_in"]) for r in runs} == {
            "everyone": ("succeeded", "database"),
            "vip": ("succeeded", "database"),
        }
    assert gist.properties("everyone") == {"c1": True, "c2": True}
    assert gist.properties("vip") == {"s1": True}

    with engine.connect() as connection:
        placed = connection.execute(
            text(
                "SELECT table_schema, count(*) FROM information_schema.tables "
                "WHERE table_name IN ('alembic_version', 'sync_runs', 'memberships') "
                "GROUP BY 1"
            )
        ).all()
        members = connection.scalar(text("SELECT count(*) FROM rv_state.memberships"))
    engine.dispose()
    assert [tuple(row) for row in placed] == [("rv_state", 3)]  # the state stays in its schema
    assert members == 3
