"""Migrations: one head, up → down → up works, and the models match what migrations build."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from audience_sync import db
from audience_sync.cli import run_cli
from audience_sync.errors import StateError
from audience_sync.fakegist import FakeGist
from audience_sync.models import metadata
from tests.conftest import API_KEY
from tests.helpers import clone_migrated_postgres, fresh_state_url, migrated_postgres_script


def test_single_head() -> None:
    script = ScriptDirectory.from_config(db.alembic_config())
    assert len(script.get_heads()) == 1
    # The at-head check reads the constant, not Alembic: a new migration must move it.
    assert script.get_current_head() == db.HEAD_REVISION


def test_current_revision_reads_what_alembic_reads(engine: Engine) -> None:
    with engine.connect() as connection:
        expected = MigrationContext.configure(connection).get_current_revision()
    assert db.current_revision(engine) == expected == db.HEAD_REVISION


def test_models_match_migrations(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []


def test_upgrade_downgrade_upgrade(state_url: str) -> None:
    engine = db.make_engine(state_url)
    try:
        db.upgrade(engine)
        assert db.current_revision(engine) == db.head_revision()
        db.downgrade(engine, "base")
        assert db.current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        db.upgrade(engine)
        tables = set(inspect(engine).get_table_names())
        assert set(metadata.tables) <= tables
    finally:
        engine.dispose()


def test_ensure_schema_migrates_sqlite_but_not_other_stores(state_url: str) -> None:
    engine = db.make_engine(state_url)
    try:
        with pytest.raises(StateError, match="audience-sync db upgrade"):
            db.ensure_schema(engine)  # reading never migrates
        assert db.current_revision(engine) is None
        if db.is_sqlite(engine):
            db.ensure_schema(engine, migrate=True)
            assert db.current_revision(engine) == db.head_revision()
        else:
            with pytest.raises(StateError, match="audience-sync db upgrade"):
                db.ensure_schema(engine, migrate=True)
            assert db.current_revision(engine) is None
    finally:
        engine.dispose()


# ---------------------------------------------------------------- safety of schema changes


def audience_sync(
    config: Path, *args: str, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as its own process on ``config``."""
    return subprocess.run(
        [sys.executable, "-m", "audience_sync", *args, "--config", str(config)],
        env={**os.environ, "GIST_API_KEY": API_KEY},
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


def spawn(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "audience_sync", *args, "--config", str(config)],
        env={**os.environ, "GIST_API_KEY": API_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_config(folder: Path, state_url: str, gist_url: str = "http://127.0.0.1:9") -> Path:
    (folder / "vip.jsonl").write_text(
        "".join(f'{{"user_id": "u{n}", "email": "u{n}@example.com"}}\n' for n in range(5))
    )
    config = folder / "audience_sync.toml"
    config.write_text(
        f"[state]\nurl = {json.dumps(state_url)}\n"
        f'[gist]\napi_key = "${{GIST_API_KEY}}"\nbase_url = {json.dumps(gist_url)}\n'
        "requests_per_second = 1000\nmax_retries = 0\n"
        '[[audiences]]\nname = "VIP"\nfile = "vip.jsonl"\n'
    )
    return config


def state_at_0002(path: Path, changes: int = 0) -> None:
    """A SQLite state file at revision 0002 holding ``changes`` delivered member changes."""
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine, "0002")
    engine.dispose()
    with sqlite3.connect(path) as connection:
        connection.execute("INSERT INTO audiences (key, name, source) VALUES ('vip', 'VIP', 'x')")
        connection.execute(
            "INSERT INTO sync_runs (id, audience_key, kind, status, started_at, source_rows,"
            " members, entered, exited, delivered, failed, rejected)"
            " VALUES (1, 'vip', 'run', 'succeeded', '2026-01-01 00:00:00', 0, 0, 0, 0, 0, 0, 0)"
        )
        connection.executemany(
            "INSERT INTO member_changes (run_id, audience_key, user_id, email, value, status,"
            " attempts) VALUES (1, 'vip', ?, ?, 1, 'delivered', 1)",
            ((f"u{n}", f"u{n}@example.com") for n in range(changes)),
        )
    connection.close()


def sqlite_schema(path: Path) -> tuple[str | None, set[str]]:
    """The revision and table names of a SQLite state file, read without migrating it."""
    with sqlite3.connect(path) as connection:
        tables = {
            r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        version = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    connection.close()
    return (version[0] if version else None), tables


def wal_size(state: Path) -> int:
    try:
        return (state.parent / f"{state.name}-wal").stat().st_size
    except FileNotFoundError:
        return 0


def upgrade_until(config: Path, state: Path, written: int) -> tuple[subprocess.Popen[str], int]:
    """``db upgrade`` as its own process, left running until its write-ahead log holds
    ``written`` bytes (or it exits); returns it and the largest log size seen."""
    process = spawn(config, "db", "upgrade")
    peak = 0
    while process.poll() is None and peak < written:
        peak = max(peak, wal_size(state))
        time.sleep(0.001)
    return process, peak


ROWS = 100_000  # enough for the upgrade's copy of member_changes to write for a while


@pytest.mark.slow
def test_a_kill_during_the_sqlite_upgrade_never_breaks_the_state(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine.db"
    state_at_0002(pristine, changes=ROWS)
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'state.db'}")
    state = tmp_path / "state.db"
    shutil.copy(pristine, state)
    # The kills land at shares of what a whole upgrade writes, not of how long it takes:
    # on a busy machine the time varies, the bytes do not.
    process, whole = upgrade_until(config, state, sys.maxsize)
    _out, err = process.communicate()
    assert process.returncode == 0, err
    head = db.head_revision()
    assert sqlite_schema(state)[0] == head
    assert whole > 0

    killed_mid_upgrade = 0
    for share in (0.5, 0.65, 0.8, 0.9):
        for leftover in tmp_path.glob("state.db*"):
            leftover.unlink()
        shutil.copy(pristine, state)
        process, _ = upgrade_until(config, state, int(whole * share))
        writing = process.poll() is None and wal_size(state) > 0
        process.kill()
        process.communicate()  # reaps it and closes its pipes
        killed_mid_upgrade += writing

        # All or nothing: the old schema untouched, or the new one complete.
        version, tables = sqlite_schema(state)
        leftovers = {t for t in tables if t.startswith("_alembic_tmp")}
        assert leftovers == set(), f"killed at {share:.0%}: {leftovers}"
        assert version in ("0002", head)
        assert ("trait_values" in tables) == (version == head), f"killed at {share:.0%}"
        # And the next upgrade works.
        again = audience_sync(config, "db", "upgrade")
        assert again.returncode == 0, again.stderr
        assert sqlite_schema(state)[0] == head
        with sqlite3.connect(state) as connection:
            assert connection.execute("SELECT count(*) FROM member_changes").fetchone() == (ROWS,)
        connection.close()
    assert killed_mid_upgrade >= 1, "no kill landed while the upgrade was writing"


@pytest.mark.slow
def test_concurrent_upgrades_wait_for_each_other(tmp_path: Path, state_url: str) -> None:
    config = write_config(tmp_path, state_url)
    processes = [spawn(config, "db", "upgrade") for _ in range(3)]
    answers = [(p.wait(timeout=120), *p.communicate()) for p in processes]
    assert [code for code, _, _ in answers] == [0, 0, 0], answers
    said = sorted("migrated" if "migrated" in out else out for _, out, _ in answers)
    assert said[:1] == ["migrated"]  # exactly one upgraded; the others found it done
    assert all(f"already at revision {db.head_revision()}" in s for s in said[1:]), said


@pytest.mark.slow
def test_first_runs_racing_on_a_fresh_sqlite_file_do_not_fail(
    tmp_path: Path, gist: FakeGist
) -> None:
    state = tmp_path / "state.db"
    config = write_config(tmp_path, f"sqlite:///{state}", gist.url)
    # Line the runs up: hold the write lock of the (empty) file until all of them wait on
    # it, then let go, so their first-time migrations start together.
    gate = sqlite3.connect(state, isolation_level=None)
    gate.execute("PRAGMA journal_mode=WAL")
    gate.execute("BEGIN IMMEDIATE")
    processes = [spawn(config, "run", "--quiet") for _ in range(4)]
    time.sleep(4)
    gate.execute("COMMIT")
    gate.close()
    answers = [(p.wait(timeout=120), *p.communicate()) for p in processes]
    codes = sorted(code for code, _, _ in answers)
    assert set(codes) <= {0, 3}, answers  # synced, or skipped for the lease; never exit 2
    assert 0 in codes
    assert len({r.body["user_id"] for r in gist.requests("/contacts")}) == 5


def test_read_only_commands_refuse_to_migrate_and_db_upgrade_says_what_it_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    state = tmp_path / "state.db"
    state_at_0002(state)
    config = str(write_config(tmp_path, f"sqlite:///{state}"))
    for args in (["history"], ["show", "1"], ["verify", "vip"], ["prune", "--older-than", "9d"]):
        assert run_cli([*args, "--config", config]) == 2, args
        err = capsys.readouterr().err
        assert f"is at revision 0002, this version needs {db.head_revision()}" in err
        assert "audience-sync db upgrade" in err
        assert sqlite_schema(state)[0] == "0002"  # reading never migrates

    assert run_cli(["db", "upgrade", "--config", config]) == 0
    assert f"migrated 0002 → {db.head_revision()}" in capsys.readouterr().out
    assert run_cli(["db", "upgrade", "--config", config]) == 0
    assert f"already at revision {db.head_revision()}" in capsys.readouterr().out
    assert run_cli(["history", "--config", config]) == 0


def test_read_only_commands_do_not_create_a_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    state = tmp_path / "state.db"
    config = str(write_config(tmp_path, f"sqlite:///{state}"))
    assert run_cli(["history", "--config", config]) == 2
    err = capsys.readouterr().err
    assert f"no state database at {state}" in err
    assert not state.exists()


def test_a_missing_state_folder_names_state_url_and_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    folder = tmp_path / "gone"
    config = str(write_config(tmp_path, f"sqlite:///{folder / 'state.db'}"))
    assert run_cli(["run", "--config", config]) == 2
    err = capsys.readouterr().err
    assert f"state.url: folder {folder} does not exist" in err
    assert "sqlalche.me" not in err


def test_sqlite_state_files_are_created_owner_only(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    engine = db.make_engine(f"sqlite:///{state}")
    try:
        db.ensure_schema(engine, migrate=True)
        with engine.connect() as connection:  # WAL and SHM exist while a connection is open
            connection.exec_driver_sql("SELECT count(*) FROM sync_runs")
            files = sorted(tmp_path.glob("state.db*"))
            assert [f.name for f in files] == ["state.db", "state.db-shm", "state.db-wal"]
            assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {"0o600"}
    finally:
        engine.dispose()


def test_a_state_file_readable_by_others_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state.db"
    sqlite3.connect(state).close()
    state.chmod(0o644)
    for _ in range(3):
        db.make_engine(f"sqlite:///{state}").dispose()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(state) in warnings[0]
    assert "chmod 600" in warnings[0]


@pytest.mark.postgres
def test_the_postgres_schema_tests_start_from_is_the_one_the_migrations_build(
    tmp_path: Path,
) -> None:
    """The ``engine`` fixture replays what ``pg_dump`` wrote of a migrated schema: it must
    hold every table, column, index, constraint and the revision the migrations leave."""
    if migrated_postgres_script() is None:
        pytest.skip("no pg_dump of the server's version here: the fixture migrates instead")

    def described(url: str) -> dict[str, object]:
        engine = db.make_engine(url)
        try:
            found = inspect(engine)
            return {
                "revision": db.current_revision(engine),
                "tables": {
                    table: (
                        [
                            (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                            for c in found.get_columns(table)
                        ],
                        found.get_pk_constraint(table),
                        sorted(found.get_foreign_keys(table), key=str),
                        sorted(found.get_indexes(table), key=str),
                        sorted(found.get_unique_constraints(table), key=str),
                        sorted(found.get_check_constraints(table), key=str),
                    )
                    for table in sorted(found.get_table_names())
                },
            }
        finally:
            engine.dispose()

    with (
        fresh_state_url("postgresql", tmp_path) as migrated,
        fresh_state_url("postgresql", tmp_path) as cloned,
    ):
        engine = db.make_engine(migrated)
        db.upgrade(engine)
        engine.dispose()
        assert clone_migrated_postgres(cloned)
        assert described(cloned) == described(migrated)
