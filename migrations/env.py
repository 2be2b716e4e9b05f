"""Alembic environment: runs on the connection or engine audience-sync injects, or on
``sqlalchemy.url``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, Engine, create_engine

from audience_sync.models import metadata

config = context.config
target_metadata = metadata


def _engine() -> Engine:
    injected = config.attributes.get("engine")
    if isinstance(injected, Engine):
        return injected
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no engine injected and no sqlalchemy.url configured")
    return create_engine(url)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # only acts on SQLite, which cannot ALTER most things
        compare_type=True,
    )
    # On a connection already in a transaction (audience-sync's own upgrade), this joins
    # it: every migration commits together or not at all.
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    shared = config.attributes.get("connection")
    if isinstance(shared, Connection):
        _run(shared)
        return
    with _engine().connect() as connection:
        _run(connection)


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
