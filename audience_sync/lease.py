"""Per-audience leases in the state database, so two processes never sync one audience at once.

Every lease time is the **database's** time (``statement_timestamp()`` on PostgreSQL,
``strftime('now')`` on SQLite), never a client's: a process whose clock runs slow or fast
cannot keep a lease that others see as expired. A holder renews its leases while it works
and *fences* each save of acknowledgements on them (``renew`` inside the saving
transaction): once a lease is lost, nothing more of that audience is recorded or sent.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterable
from functools import cache

from sqlalchemy import ColumnElement, Engine, delete, literal_column, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError

from audience_sync.errors import LockHeldError
from audience_sync.models import leases

log = logging.getLogger(__name__)

LEASE_SECONDS = 60


def new_owner() -> str:
    """A name for this process's leases: ``host/boot-id.pid-namespace:pid:random-tag``.

    The boot id tells two machines (or two boots of one) apart even when they share a host
    name, and the pid namespace two containers of one machine: only an owner with both
    equal to ours is a process whose liveness we can check with a signal.
    """
    return f"{_place()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def database_now(dialect: str, plus_seconds: int = 0) -> ColumnElement[object]:
    """The database's current UTC time (plus ``plus_seconds``) as a naive timestamp, the way
    every timestamp is stored."""
    if dialect == "sqlite":
        # strftime's %f has milliseconds; three more digits make the microseconds that
        # SQLAlchemy stores and parses for SQLite.
        shift = f", '{plus_seconds:+d} seconds'" if plus_seconds else ""
        return literal_column(f"(strftime('%Y-%m-%d %H:%M:%f', 'now'{shift}) || '000')")
    shift = f" + interval '{plus_seconds:d} seconds'" if plus_seconds else ""
    return literal_column(f"((statement_timestamp() AT TIME ZONE 'UTC'){shift})")


def acquire(engine: Engine, audience_key: str, owner: str) -> str | None:
    """Take the audience's lease, or raise LockHeldError when a live lease belongs to another.

    A lease expires ``LEASE_SECONDS`` after its last renewal (database time), so a process
    killed with ``kill -9`` blocks others for at most that long; on the same machine a dead
    holder is recognised at once. Returns the previous owner when it took over an expired
    or dead holder's lease, else None.
    """
    now, expires = _now(engine), _now(engine, LEASE_SECONDS)
    with engine.begin() as connection:
        held = connection.execute(
            select(leases.c.owner, leases.c.expires_at, (leases.c.expires_at >= now)).where(
                leases.c.audience_key == audience_key
            )
        ).first()
        if held is not None:
            owner_then, expires_then, live = held
            if live and not is_dead_local_owner(owner_then):
                raise LockHeldError(audience_key, owner_then)
            # Compare-and-swap on the old holder, so of two takers only one wins.
            taken = connection.execute(
                update(leases)
                .where(
                    leases.c.audience_key == audience_key,
                    leases.c.owner == owner_then,
                    leases.c.expires_at == expires_then,
                )
                .values(owner=owner, acquired_at=now, expires_at=expires)
            ).rowcount
            if not taken:
                raise LockHeldError(audience_key, "another process")
            log.warning("%s: took over the lease of %s (expired or dead)", audience_key, owner_then)
            return str(owner_then)
    try:
        with engine.begin() as connection:
            connection.execute(
                leases.insert().values(
                    audience_key=audience_key, owner=owner, acquired_at=now, expires_at=expires
                )
            )
    except IntegrityError:
        raise LockHeldError(audience_key, "another process") from None
    return None


def is_dead_local_owner(owner: str) -> bool:
    """True when ``owner`` names a process of this machine, boot and pid namespace that is
    gone."""
    try:
        place, pid_text, _tag = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if place != _place() or place.endswith("?"):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def place() -> tuple[str, str]:
    """This machine's host name and boot id, as owner names carry them."""
    return socket.gethostname(), _boot_id()


@cache
def _place() -> str:
    return f"{socket.gethostname()}/{_boot_id()}.{_pid_namespace()}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip().replace("-", "")[:12] or "?"
    except OSError:
        return "?"


def _pid_namespace() -> str:
    # Containers may share a host name but not a pid space: only trust a pid in our own.
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "?"


def renew(connection: Connection, keys: Iterable[str], owner: str) -> set[str]:
    """Extend this owner's unexpired leases on ``keys`` inside the caller's transaction;
    returns the keys still held. The row locks it takes (PostgreSQL) or the write lock
    (SQLite) keep the leases from changing hands until that transaction ends, so work saved
    in it is fenced."""
    keys = sorted(set(keys))
    if not keys:
        return set()
    dialect = connection.dialect.name
    held = connection.execute(
        update(leases)
        .where(
            leases.c.audience_key.in_(keys),
            leases.c.owner == owner,
            leases.c.expires_at >= database_now(dialect),
        )
        .values(expires_at=database_now(dialect, LEASE_SECONDS))
        .returning(leases.c.audience_key)
    ).scalars()
    return set(held)


def release(engine: Engine, keys: Iterable[str], owner: str) -> None:
    """Give up this owner's leases."""
    keys = list(keys)
    if keys:
        with engine.begin() as connection:
            connection.execute(
                delete(leases).where(leases.c.audience_key.in_(keys), leases.c.owner == owner)
            )


def _now(engine: Engine, plus_seconds: int = 0) -> ColumnElement[object]:
    return database_now(engine.dialect.name, plus_seconds)


class Heartbeat:
    """Renews a set of leases every third of their length in a background thread; ``lost``
    is set once any of them was lost (expired and taken, or renewed too late)."""

    def __init__(self, engine: Engine, owner: str) -> None:
        self._engine = engine
        self._owner = owner
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
        self.lost = threading.Event()

    @property
    def owner(self) -> str:
        """The owner name the leases are held under."""
        return self._owner

    def add(self, key: str) -> None:
        """Keep ``key``'s lease alive from now on."""
        with self._lock:
            self._keys.add(key)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 3):
            with self._lock:
                keys = set(self._keys)
            try:
                with self._engine.begin() as connection:
                    held = renew(connection, keys, self._owner)
            except OperationalError:
                # A busy or briefly unreachable database: the next beat tries again, and
                # the lease still has two thirds of its length to run.
                continue
            if held != keys:
                log.error("lost the lease of %s", ", ".join(sorted(keys - held)))
                self.lost.set()
