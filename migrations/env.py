"""Alembic environment: runs on the engine audience-sync injects, or on ``sqlalchemy.url``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, create_engine

from audience_sync.models import Base

config = context.config
target_metadata = Base.metadata


def _engine() -> Engine:
    injected = config.attributes.get("engine")
    if isinstance(injected, Engine):
        return injected
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no engine injected and no sqlalchemy.url configured")
    return create_engine(url)


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # only acts on SQLite, which cannot ALTER most things
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
