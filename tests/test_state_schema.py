"""``state.schema``: the PostgreSQL state in a schema of its own, created by ``db upgrade``."""

from __future__ import annotations

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
