"""Per-audience leases in the state database, so two processes never sync one audience at once."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from audience_sync.errors import LockHeldError
from audience_sync.models import leases

log = logging.getLogger(__name__)

LEASE_SECONDS = 60

Clock = Callable[[], datetime]


def new_owner() -> str:
    """A name for this process's leases: ``host/pid-namespace:pid:random-tag``."""
    return f"{socket.gethostname()}/{_pid_namespace()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def acquire(engine: Engine, audience_key: str, owner: str, now: datetime) -> str | None:
    """Take the audience's lease, or raise LockHeldError when a live lease belongs to another.

    A lease expires ``LEASE_SECONDS`` after its last renewal, so a process killed with
    ``kill -9`` blocks others for at most that long; on the same machine a dead holder is
    recognised at once. Returns the previous owner when it took over an expired or dead
    holder's lease, else None.
    """
    expires = now + timedelta(seconds=LEASE_SECONDS)
    with engine.begin() as connection:
        held = connection.execute(
            select(leases.c.owner, leases.c.expires_at).where(leases.c.audience_key == audience_key)
        ).first()
        if held is not None:
            if held.expires_at >= now and not is_dead_local_owner(held.owner):
                raise LockHeldError(audience_key, held.owner)
            # Compare-and-swap on the old holder, so of two takers only one wins.
            taken = connection.execute(
                update(leases)
                .where(
                    leases.c.audience_key == audience_key,
                    leases.c.owner == held.owner,
                    leases.c.expires_at == held.expires_at,
                )
                .values(owner=owner, acquired_at=now, expires_at=expires)
            ).rowcount
            if not taken:
                raise LockHeldError(audience_key, "another process")
            log.warning("%s: took over the lease of %s (expired or dead)", audience_key, held.owner)
            return str(held.owner)
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
    """True when ``owner`` names a process of this machine (and pid namespace) that is gone."""
    try:
        place, pid_text, _tag = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if place != f"{socket.gethostname()}/{_pid_namespace()}" or place.endswith("/?"):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _pid_namespace() -> str:
    # Containers may share a host name but not a pid space: only trust a pid in our own.
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "?"


def renew(engine: Engine, keys: Iterable[str], owner: str, now: datetime) -> bool:
    """Extend this owner's leases; False when any of them was lost (expired and taken)."""
    keys = list(keys)
    if not keys:
        return True
    with engine.begin() as connection:
        renewed = connection.execute(
            update(leases)
            .where(leases.c.audience_key.in_(keys), leases.c.owner == owner)
            .values(expires_at=now + timedelta(seconds=LEASE_SECONDS))
        ).rowcount
    return renewed == len(keys)


def release(engine: Engine, keys: Iterable[str], owner: str) -> None:
    """Give up this owner's leases."""
    keys = list(keys)
    if keys:
        with engine.begin() as connection:
            connection.execute(
                delete(leases).where(leases.c.audience_key.in_(keys), leases.c.owner == owner)
            )


class Heartbeat:
    """Renews a set of leases every third of their length in a background thread."""

    def __init__(self, engine: Engine, owner: str, clock: Clock) -> None:
        self._engine = engine
        self._owner = owner
        self._clock = clock
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
        self.lost = threading.Event()

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
                keys = list(self._keys)
            try:
                if not renew(self._engine, keys, self._owner, self._clock()):
                    self.lost.set()
            except OperationalError:
                # A busy or briefly unreachable database: the next beat tries again, and
                # the lease still has two thirds of its length to run.
                continue
