"""State database: engine creation (SQLite pragmas), migrations to head, the at-head check."""

from __future__ import annotations

import importlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from audience_sync.config import Settings, redact_url
from audience_sync.errors import StateError

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

# The newest migration in migrations/versions: a constant, so that checking a state database
# is at head needs no Alembic (a test holds it equal to the script directory's head).
HEAD_REVISION = "0011"
VERSION_TABLE = "alembic_version"
UPGRADE_WAIT_SECONDS = 120  # how long a second upgrader waits for the first (PostgreSQL)


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


def make_engine(url: str, *, schema: str | None = None, create: bool = True) -> Engine:
    """An engine for the state database; SQLite gets WAL, a busy timeout and foreign keys.

    ``schema`` (PostgreSQL) puts the state tables in that schema: every connection sets it
    as its ``search_path`` (``SET SESSION``, so that ``SET search_path TO DEFAULT`` still
    returns to the database's or role's own, which warehouse-native queries run with), and
    every statement, Alembic's included, stays unqualified.

    A SQLite state file is created owner-only (0600; its -wal and -shm files take the
    same mode), because it holds every member's email; an existing one that others can
    read is warned about once. ``create=False`` refuses a file that does not exist yet
    (read-only commands never create one). ``StateError`` names ``state.url`` and the path
    when its folder is missing.
    """
    url = normalize_url(url)
    try:
        if make_url(url).get_backend_name() != "sqlite":
            engine = create_engine(url, pool_pre_ping=True, connect_args=_bounded_waits(url))
            if schema:
                _use_schema(engine, schema)
            return engine
        path = sqlite_path(url)
        if path is not None:
            _prepare_sqlite_file(url, path, create)
        return _sqlite_engine(url, path=path)
    except ImportError as exc:
        # The driver is imported when the engine is made: say which extra brings it.
        raise StateError(
            f"state.url {redact_url(url)}: its database driver is not installed "
            f"({exc.name or exc}); install it with: {driver_hint(url)}"
        ) from exc


# libpq's parameters that bound every wait on a state database that stops answering: a
# connection attempt gives up after connect_timeout; an open connection whose peer went
# silent (a partition drops packets: no reset ever comes) is closed by the kernel once sent
# data stays unacknowledged for tcp_user_timeout, or keepalive probes go unanswered. A long
# query is not cut: the server's kernel acknowledges the probes while it computes.
LIBPQ_BOUNDS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}


def _bounded_waits(url: str) -> dict[str, Any]:
    """The driver's connection arguments that bound its waits (``LIBPQ_BOUNDS`` for
    PostgreSQL), less those the URL sets itself: the URL's win."""
    parsed = make_url(url)
    # Other drivers know connect_timeout alone (keyword arguments they do not know fail).
    bounds = LIBPQ_BOUNDS if parsed.get_backend_name() == "postgresql" else {"connect_timeout": 10}
    return {key: value for key, value in bounds.items() if key not in parsed.query}


def _use_schema(engine: Engine, schema: str) -> None:
    """Make ``schema`` the search_path of each new connection of ``engine``, in a session
    setting rather than a connection option (``-csearch_path``): an option would become the
    session's default, and ``SET … TO DEFAULT`` would return to it."""

    # insert=True: before SQLAlchemy's own first-connect handler reads current_schema().
    @event.listens_for(engine, "connect", insert=True)
    def _search_path(dbapi_connection: Any, _record: Any) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True  # the setting outlives no rolled-back transaction
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET SESSION search_path TO {quote_schema(schema)}")
        dbapi_connection.autocommit = autocommit


def _sqlite_engine(url: str, *, immediate: bool = False, path: Path | None = None) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 60})
    watch = _FileIdentity(path) if path is not None else None

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        if watch is not None:
            watch.note()
        cursor = dbapi_connection.cursor()
        # WAL lets history readers and the lease heartbeat work beside a running sync.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
        if immediate:
            # pysqlite leaves DDL outside any transaction; SQLAlchemy's recipe hands
            # transaction control to the begin event below instead.
            dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock at once: a second upgrader waits here (busy
        # timeout) and then finds the schema already upgraded. A transaction that reads
        # the state and then writes it (planning) asks for it too: begun deferred, its
        # write would fail at once ("database is locked", no busy wait) whenever another
        # connection (a lease or worker heartbeat) committed after its first read.
        if watch is not None:
            watch.check()
        if immediate or connection.get_execution_options().get(WRITE_LOCK):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class _FileIdentity:
    """Which file a SQLite state path named when the engine first opened it (device and
    inode), checked as each transaction begins: a state file deleted or replaced while a
    daemon runs would otherwise take every later write into the unlinked file, each run
    "succeeding", until a restart loses them all."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._known: tuple[int, int] | None = None

    def _current(self) -> tuple[int, int] | None:
        try:
            found = os.stat(self._path)
        except FileNotFoundError:
            return None
        return found.st_dev, found.st_ino

    def note(self) -> None:
        """Remember the file the first connection opened."""
        if self._known is None:
            self._known = self._current()

    def check(self) -> None:
        """Raise StateError when the path no longer names that file."""
        if self._known is None:
            return
        current = self._current()
        if current != self._known:
            what = "deleted" if current is None else "replaced by another file"
            raise StateError(
                f"the state file {self._path} was {what} while audience-sync was running; "
                "nothing more is written to the old one. Restart audience-sync (without "
                "the state, every audience is synced again from the start)"
            )


WRITE_LOCK = "audience_sync_write_lock"
"""A connection execution option: on SQLite, its transactions take the write lock when
they begin (see ``_sqlite_engine``); on PostgreSQL row locks make it needless."""


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


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for an in-memory database."""
    parsed = make_url(url)
    database = parsed.database
    if not database or database == ":memory:":
        return None
    if database.startswith("file:") and parsed.query.get("uri") == "true":
        name = database.removeprefix("file:")
        if not name or name.startswith(":") or parsed.query.get("mode") == "memory":
            return None
        if name.startswith("//"):  # file://host/path: only the path part names the file
            name = "/" + name[2:].partition("/")[2]
        return Path(name)
    return Path(database)


_warned_readable: set[Path] = set()


def _prepare_sqlite_file(url: str, path: Path, create: bool) -> None:
    shown = redact_url(url)
    if not path.exists():
        if not path.parent.is_dir():
            raise StateError(
                f"state.url: folder {path.parent} does not exist ({shown}); create it or "
                "point state.url elsewhere"
            )
        if not create:
            raise StateError(
                f"no state database at {path} (state.url {shown}) yet: run "
                "`audience-sync run` or `audience-sync db upgrade` first"
            )
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass  # another process created it first: it is as private as ours
        except OSError as exc:
            raise StateError(f"state.url {shown}: cannot create {path}: {exc.strerror}") from None
        return
    mode = path.stat().st_mode
    if mode & 0o077 and path not in _warned_readable:
        _warned_readable.add(path)
        log.warning(
            "state database %s is readable by other users (mode %s) and holds members' "
            "emails: run `chmod 600 %s`",
            path, oct(stat.S_IMODE(mode)), path,
        )  # fmt: skip


def upsert(engine: Engine, table: Table) -> Any:
    """``INSERT ... ON CONFLICT`` for the state database's dialect (SQLite or PostgreSQL)."""
    if engine.dialect.name == "postgresql":
        # The postgresql package imports every driver's dialect: only when it is the store.
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def is_sqlite(engine: Engine) -> bool:
    """True when the state database is SQLite."""
    return engine.dialect.name == "sqlite"


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic config for our migrations, run on ``engine`` when given."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Migrate the state database to ``revision``; returns the revisions before and after.

    All migrations run in one transaction, so a crash or ``kill -9`` leaves the old schema
    or the new one, never half of it (on SQLite as on PostgreSQL). Upgrades are serialized:
    on SQLite by ``BEGIN IMMEDIATE``, on PostgreSQL by an advisory lock per schema; the
    second upgrader waits, then finds the work done.
    """
    from alembic import command

    return _migrate(engine, lambda config: command.upgrade(config, revision))


def downgrade(engine: Engine, revision: str) -> tuple[str | None, str | None]:
    """Migrate the state database down to ``revision``, in one transaction like upgrade."""
    from alembic import command

    return _migrate(engine, lambda config: command.downgrade(config, revision))


def _migrate(engine: Engine, run: Callable[[Config], None]) -> tuple[str | None, str | None]:
    from alembic.runtime.migration import MigrationContext

    shown = redact_url(str(engine.url))
    migrating = _migration_engine(engine)
    try:
        with migrating.connect() as connection, connection.begin():
            if connection.dialect.name == "postgresql":
                _lock_schema(connection, shown)
            before = MigrationContext.configure(connection).get_current_revision()
            config = alembic_config()
            config.attributes["connection"] = connection
            run(config)
            after = MigrationContext.configure(connection).get_current_revision()
    except OperationalError as exc:
        if "database is locked" in str(exc):
            raise StateError(
                f"cannot migrate {shown}: another process kept the state database locked "
                "for 60 s (another upgrade or a running sync); try again when it ends"
            ) from None
        raise StateError(f"cannot migrate {shown}: {describe_error(exc)}") from exc
    except SQLAlchemyError as exc:
        raise StateError(f"cannot migrate {shown}: {describe_error(exc)}") from exc
    finally:
        if migrating is not engine:
            migrating.dispose()
    return before, after


def _migration_engine(engine: Engine) -> Engine:
    """SQLite: a twin engine whose transactions cover DDL and take the write lock at once."""
    url = engine.url.render_as_string(hide_password=False)
    if not is_sqlite(engine) or sqlite_path(url) is None:
        return engine  # PostgreSQL's DDL is transactional already; memory has one user
    return _sqlite_engine(url, immediate=True)


def _lock_schema(connection: Connection, shown: str) -> None:
    """Take this schema's migration lock for the transaction, waiting a bounded time."""
    key = "hashtext(current_schema() || '.audience_sync.migrations')"
    if connection.scalar(text(f"SELECT pg_try_advisory_xact_lock({key})")):
        return
    log.warning("another upgrade of %s is running; waiting for it to finish", shown)
    connection.execute(text(f"SET LOCAL lock_timeout = '{UPGRADE_WAIT_SECONDS}s'"))
    try:
        connection.execute(text(f"SELECT pg_advisory_xact_lock({key})"))
    except OperationalError:
        raise StateError(
            f"cannot migrate {shown}: another upgrade has been running for over "
            f"{UPGRADE_WAIT_SECONDS} s; try again when it ends"
        ) from None
    connection.execute(text("SET LOCAL lock_timeout = 0"))


def head_revision() -> str:
    """The newest migration shipped with this version (``tests/test_migrations.py`` checks it
    against Alembic's script directory)."""
    return HEAD_REVISION


def current_revision(engine: Engine) -> str | None:
    """The revision the state database is at, or None when it was never migrated.

    Read as Alembic's ``MigrationContext.get_current_revision`` reads it (the version table
    in the connection's default schema), without importing Alembic: every command checks
    it, and Alembic's import alone costs more than most commands' work.
    """
    with engine.connect() as connection:
        if not inspect(connection).has_table(VERSION_TABLE):
            return None
        found = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    if len(found) > 1:
        raise StateError(
            f"state database {redact_url(str(engine.url))} records {len(found)} migration "
            "heads; this version has one: run `audience-sync db upgrade`"
        )
    return str(found[0][0]) if found else None


def ensure_schema(engine: Engine, *, migrate: bool = False) -> None:
    """Check that the state database is at head; with ``migrate``, upgrade SQLite to it.

    Only commands that sync (``run``, ``backfill``, ``retire``, ``daemon``) pass ``migrate``:
    the embedded SQLite file belongs to this tool alone, so they upgrade it on the fly,
    atomically. Reading never migrates, and a shared production database (PostgreSQL) is
    migrated only on purpose, with ``db upgrade``.
    """
    shown = redact_url(str(engine.url))
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        raise StateError(f"cannot open state database {shown}: {describe_error(exc)}") from exc
    head = head_revision()
    if current == head:
        return
    if migrate and is_sqlite(engine):
        upgrade(engine)
        return
    if current is None:
        # A sync migrates only SQLite: for any other store, `db upgrade` is the one way.
        alternative = " (or a `run`)" if is_sqlite(engine) else ""
        raise StateError(
            f"state database {shown} has no audience-sync schema yet: run "
            f"`audience-sync db upgrade`{alternative} first"
        )
    raise StateError(
        f"state database {shown} is at revision {current}, this version needs {head}: "
        "run `audience-sync db upgrade`"
    )


@contextmanager
def open_state(settings: Settings, *, writes: bool = True) -> Iterator[Engine]:
    """The state database, at head, closed afterwards.

    Commands that sync (``writes``) create a missing SQLite file and upgrade an old one on
    the fly (atomically); the others (``history``, ``show``, ``verify``, ``prune``) never
    create or migrate it and ask for ``db upgrade`` instead (see ``ensure_schema``).

    The one boundary of state-database errors: whatever the body raises from the database
    becomes a ``StateError`` with its first line only (no SQL, no bound parameters).
    """
    with state_errors(settings.state.url):
        engine = make_engine(settings.state.url, schema=settings.state.db_schema, create=writes)
        try:
            ensure_schema(engine, migrate=writes)
            yield engine
        finally:
            engine.dispose()
