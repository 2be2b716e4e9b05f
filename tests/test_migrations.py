"""Migrations: one head, up → down → up works, and the models match what migrations build."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from audience_sync import db
from audience_sync.errors import StateError
from audience_sync.models import Base


def test_single_head() -> None:
    script = ScriptDirectory.from_config(db.alembic_config())
    assert len(script.get_heads()) == 1


def test_models_match_migrations(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


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
        assert set(Base.metadata.tables) <= tables
    finally:
        engine.dispose()


def test_ensure_schema_migrates_sqlite_but_not_other_stores(state_url: str) -> None:
    engine = db.make_engine(state_url)
    try:
        if db.is_sqlite(engine):
            db.ensure_schema(engine)
            assert db.current_revision(engine) == db.head_revision()
        else:
            with pytest.raises(StateError, match="audience-sync db upgrade"):
                db.ensure_schema(engine)
            assert db.current_revision(engine) is None
    finally:
        engine.dispose()
