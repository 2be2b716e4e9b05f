"""State database: engine creation (SQLite pragmas), migrations to head, the at-head check."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, Table, create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.config import redact_url
from audience_sync.errors import StateError


def migrations_dir() -> Path:
    """Where the Alembic scripts are: ``migrations/`` in a checkout, mapped into the package
    ``audience_sync.migrations`` by the build (editable or not)."""
    package = importlib.import_module("audience_sync.migrations")
    assert package.__file__ is not None  # a regular package, with an __init__.py
    return Path(package.__file__).parent


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (the driver audience-sync ships with)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, *, schema: str | None = None) -> Engine:
    """An engine for the state database; SQLite gets WAL, a busy timeout and foreign keys.

    ``schema`` (PostgreSQL) puts the state tables in that schema: it is the connections'
    ``search_path``, so every statement, Alembic's included, stays unqualified.
    """
    url = normalize_url(url)
    try:
        if make_url(url).get_backend_name() != "sqlite":
            connect_args = {"options": f"-csearch_path={quote_schema(schema)}"} if schema else {}
            return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        engine = create_engine(url, connect_args={"timeout": 60})
    except ImportError as exc:
        # The driver is imported when the engine is made: say which extra brings it.
        raise StateError(
            f"state.url {redact_url(url)}: its database driver is not installed "
            f"({exc.name or exc}); install it with: {driver_hint(url)}"
        ) from exc

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets history readers and the lease heartbeat work beside a running sync.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def driver_hint(url: str) -> str:
    """How to install the driver of ``url``'s database."""
    backend = make_url(url).get_backend_name()
    if backend == "postgresql":
        return "pip install 'audience-sync[postgres]'"
    return f"pip install the SQLAlchemy driver for {backend}"


def quote_schema(schema: str) -> str:
    """``schema`` as a PostgreSQL identifier (config validation allows ``[a-z_][a-z0-9_]*``)."""
    return f'"{schema}"'


def describe_error(exc: BaseException) -> str:
    """A database error's first line, naming its kind: never the SQL, never bound parameters
    (they hold users' emails)."""
    orig = getattr(exc, "orig", None)
    source = orig if isinstance(orig, BaseException) else exc
    lines = str(source).strip().splitlines()
    first = lines[0].strip() if lines else ""
    # SQLAlchemy's own messages append the statement after the first line; a driver's may
    # put a "DETAIL: Key (email)=(...)" there. Only the first line goes out.
    return f"{type(source).__name__}: {first}" if first else type(source).__name__


def create_schema(engine: Engine, schema: str) -> None:
    """Create the PostgreSQL schema ``state.schema`` names, unless it exists."""
    with engine.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quote_schema(schema)}")


@contextmanager
def state_errors(url: str) -> Iterator[None]:
    """Translate the state database's errors into ``StateError``: the one place it happens."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise StateError(f"state database {redact_url(url)}: {describe_error(exc)}") from exc


def upsert(engine: Engine, table: Table) -> Any:
    """``INSERT ... ON CONFLICT`` for the state database's dialect (SQLite or PostgreSQL)."""
    dialect_insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    return dialect_insert(table)


def is_sqlite(engine: Engine) -> bool:
    """True when the state database is SQLite."""
    return engine.dialect.name == "sqlite"


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic config for our migrations, run on ``engine`` when given."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the state database to ``revision``."""
    try:
        command.upgrade(alembic_config(engine), revision)
    except SQLAlchemyError as exc:
        raise StateError(
            f"cannot migrate {redact_url(str(engine.url))}: {describe_error(exc)}"
        ) from exc


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the state database down to ``revision``."""
    command.downgrade(alembic_config(engine), revision)


def head_revision() -> str | None:
    """The newest migration shipped with this version."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the state database is at, or None when it was never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ensure_schema(engine: Engine) -> None:
    """Migrate SQLite to head on the fly; refuse to touch any other store that is behind.

    The embedded SQLite file belongs to this tool alone, so upgrading it is safe. A shared
    production database (PostgreSQL) is migrated only on purpose, with ``db upgrade``.
    """
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        raise StateError(
            f"cannot open state database {redact_url(str(engine.url))}: {describe_error(exc)}"
        ) from exc
    head = head_revision()
    if current == head:
        return
    if is_sqlite(engine):
        upgrade(engine)
        return
    raise StateError(
        f"state database {redact_url(str(engine.url))} is at revision {current or 'none'}, "
        f"this version needs {head}: run `audience-sync db upgrade`"
    )
