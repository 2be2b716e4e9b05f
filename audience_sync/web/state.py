"""The pages' state database: an engine that cannot write, whatever a query asks.

Read-only by construction rather than by care: every PostgreSQL transaction of this engine
starts with ``SET TRANSACTION READ ONLY``, and every SQLite connection has ``PRAGMA
query_only`` on, so a write (a bug, an injected statement) fails in the database itself.
On PostgreSQL the pages may also run as a role that holds only ``SELECT`` (docs/ui.md: History
in a browser).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event

from audience_sync import db
from audience_sync.config import Settings


def read_only_engine(url: str, *, schema: str | None = None) -> Engine:
    """An engine over the state database at ``url`` that can only read; a SQLite file that
    does not exist is refused (``StateError``), never created."""
    engine = db.make_engine(url, schema=schema, create=False)
    make_read_only(engine)
    return engine


def make_read_only(engine: Engine) -> None:
    """Make every later connection and transaction of ``engine`` read-only; call before
    its first connection (a pooled one made earlier would keep writing)."""
    if db.is_sqlite(engine):

        @event.listens_for(engine, "connect")
        def _query_only(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA query_only = ON")
            cursor.close()

        return

    @event.listens_for(engine, "begin")
    def _read_only(connection: Any) -> None:
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def open_pages_state(settings: Settings) -> Engine:
    """The read-only engine of ``settings``' state database, checked to be at the schema
    this version reads (``StateError`` otherwise: the pages never migrate)."""
    with db.state_errors(settings.state.url):
        engine = read_only_engine(settings.state.url, schema=settings.state.db_schema)
        try:
            db.ensure_schema(engine)
        except BaseException:
            engine.dispose()
            raise
    return engine
