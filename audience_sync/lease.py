"""Per-audience leases in the state database, so two processes never sync one audience at once.

Every lease time is the **database's** time (``statement_timestamp()`` on PostgreSQL,
``strftime('now')`` on SQLite), never a client's: a process whose clock runs slow or fast
cannot keep a lease that others see as expired. A ``Holder`` renews its leases while it
works, *fences* each save of acknowledgements on them (``renew`` inside the saving
transaction), and lets a request out only while its lease certainly outlasts it: once a
lease is lost or too long unconfirmed, nothing more of that audience is recorded or sent.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, Engine, literal_column, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from audience_sync.errors import FencedError, LockHeldError, StateError
from audience_sync.models import leases

if TYPE_CHECKING:
    from audience_sync.config import Settings

log = logging.getLogger(__name__)

LEASE_SECONDS = 60

# (state database, owner, key) of every lease a holder of this process holds now. The
# database knows owners, not holders: a live lease of an owner of ours that no holder here
# holds is one whose release could not be recorded (the state database was down as its run
# ended), and its owner's next run takes it back at once, as it would a released one; a
# second holder of one owner in this process waits like any other.
_holding: set[tuple[str, str, str]] = set()
_holding_lock = threading.Lock()


def new_owner() -> str:
    """A name for this process's leases: ``host/boot-id.pid-namespace:pid:random-tag``.

    The boot id tells two machines (or two boots of one) apart even when they share a host
    name, and the pid namespace two containers of one machine: only an owner with both
    equal to ours is a process whose liveness we can check with a signal.
    """
    return f"{_place()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def database_now(dialect: str, plus_seconds: float = 0) -> ColumnElement[object]:
    """The database's current UTC time (plus ``plus_seconds``) as a naive timestamp, the way
    every timestamp is stored."""
    if dialect == "sqlite":
        # strftime's %f has milliseconds; three more digits make the microseconds that
        # SQLAlchemy stores and parses for SQLite.
        shift = f", '{plus_seconds:+.3f} seconds'" if plus_seconds else ""
        return literal_column(f"(strftime('%Y-%m-%d %H:%M:%f', 'now'{shift}) || '000')")
    shift = f" + interval '{plus_seconds:.3f} seconds'" if plus_seconds else ""
    return literal_column(f"((statement_timestamp() AT TIME ZONE 'UTC'){shift})")


def acquire(
    engine: Engine, audience_key: str, owner: str, seconds: float = LEASE_SECONDS
) -> str | None:
    """Take the audience's lease, or raise LockHeldError when a live lease belongs to another.

    A lease expires ``seconds`` after its last renewal (database time), so a process
    killed with ``kill -9`` blocks others for at most that long; on the same machine a dead
    holder is recognised at once. A live lease of ``owner`` itself is taken back (``Holder``
    keeps two holders of one owner apart). Returns the previous owner when it took over an
    expired or dead holder's lease, else None.
    """
    now, expires = _now(engine), _now(engine, seconds)
    with engine.begin() as connection:
        held = connection.execute(
            select(
                leases.c.owner,
                leases.c.expires_at,
                (leases.c.expires_at >= now),
                leases.c.released_at.is_not(None),
            ).where(leases.c.audience_key == audience_key)
        ).first()
        if held is not None:
            owner_then, expires_then, live, released = held
            if (
                live
                and not released
                and owner_then != owner
                and not is_dead_local_owner(owner_then)
            ):
                raise LockHeldError(audience_key, owner_then)
            # Compare-and-swap on the old holder, so of two takers only one wins.
            taken = connection.execute(
                update(leases)
                .where(
                    leases.c.audience_key == audience_key,
                    leases.c.owner == owner_then,
                    leases.c.expires_at == expires_then,
                )
                .values(owner=owner, acquired_at=now, expires_at=expires, released_at=None)
            ).rowcount
            if not taken:
                raise LockHeldError(audience_key, "another process")
            if released or owner_then == owner:
                return None
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
    # Unknown boot id or pid namespace: another machine (or container) can have the same
    # place, and its live process no pid here; only a pid whose place is certain is judged.
    if place != _place() or "?" in (_boot_id(), _pid_namespace()):
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


def renew(
    connection: Connection, keys: Iterable[str], owner: str, seconds: float = LEASE_SECONDS
) -> set[str]:
    """Extend this owner's unexpired leases on ``keys`` to ``seconds`` from now (database
    time) inside the caller's transaction; returns the keys still held. The row locks it
    takes (PostgreSQL) or the write lock (SQLite) keep the leases from changing hands until
    that transaction ends, so work saved in it is fenced."""
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
            leases.c.released_at.is_(None),
        )
        .values(expires_at=database_now(dialect, seconds))
        .returning(leases.c.audience_key)
    ).scalars()
    return set(held)


def release(engine: Engine, keys: Iterable[str], owner: str) -> None:
    """Give up this owner's leases: free at once, the rows still naming this owner as the
    last holder (so a holder that lost a lease meanwhile learns who took it)."""
    keys = list(keys)
    if keys:
        now = _now(engine)
        with engine.begin() as connection:
            connection.execute(
                update(leases)
                .where(
                    leases.c.audience_key.in_(keys),
                    leases.c.owner == owner,
                    leases.c.released_at.is_(None),
                )
                .values(expires_at=now, released_at=now)
            )


def _now(engine: Engine, plus_seconds: float = 0) -> ColumnElement[object]:
    return database_now(engine.dialect.name, plus_seconds)


class Holder:
    """This process's leases for one invocation, and the fence on everything it sends.

    Gist cannot check a fencing token, so the sender fences itself: a request for a key
    leaves only while (time since the holder's last *confirmed* renewal of that key's lease,
    on this process's monotonic clock) + the request's deadline < the lease length. A
    renewal counts from just before its statement was sent, once its transaction committed,
    so the lease, which runs ``seconds`` from the database's time of the statement, outlasts
    every request let out under it: a holder stopped (SIGSTOP, a long pause, a frozen VM)
    past its lease finds on waking that nothing may leave, before any other holder can have
    taken the lease over (a taker waits for the lease to expire on the database's clock).

    Leases are renewed by a heartbeat thread and by every fenced save (``fenced``); a key
    whose renewal finds the lease gone is lost for good (``lost``, ``loss``).
    """

    def __init__(
        self,
        engine: Engine,
        owner: str,
        *,
        seconds: float = LEASE_SECONDS,
        request_seconds: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if request_seconds >= seconds:
            raise ValueError("a request's deadline must be shorter than the lease")
        self._engine = engine
        self._database = engine.url.render_as_string(hide_password=True)
        self.owner = owner
        self.seconds = seconds
        self.request_seconds = request_seconds
        self._monotonic = monotonic
        self._confirmed: dict[str, float] = {}  # key → monotonic time its renewal was sent
        self._lost: dict[str, str] = {}  # key → why
        self._taken: set[str] = set()  # every key acquired, until released
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self.lost = threading.Event()

    @property
    def keys(self) -> set[str]:
        """The keys taken and not released."""
        with self._lock:
            return set(self._confirmed)

    @property
    def beat_seconds(self) -> float:
        """How often the heartbeat renews: three times within the time a request may still
        leave after a renewal, so two beats can fail before the fence closes."""
        return (self.seconds - self.request_seconds) / 3

    def acquire(self, key: str) -> str | None:
        """Take ``key``'s lease (see ``acquire``); raises LockHeldError when it is held."""
        mine = (self._database, self.owner, key)
        with _holding_lock:
            if mine in _holding:
                raise LockHeldError(key, self.owner)
            _holding.add(mine)
        started = self._monotonic()
        try:
            previous = acquire(self._engine, key, self.owner, self.seconds)
        except BaseException:
            with _holding_lock:
                _holding.discard(mine)
            raise
        with self._lock:
            self._taken.add(key)
            self._confirmed[key] = started
            self._lost.pop(key, None)
        return previous

    @contextmanager
    def fenced(self, keys: Iterable[str]) -> Iterator[tuple[Connection, set[str]]]:
        """A transaction that first renews the leases of ``keys``: yields it and the keys
        still held; what it writes of a key not held must be left out. The renewal counts
        for the fence once the transaction has committed."""
        keys = set(keys)
        started = self._monotonic()
        with self._engine.begin() as connection:
            held = renew(connection, keys, self.owner, self.seconds)
            losses = describe_losses(connection, keys - held, self.owner)
            yield connection, held
        with self._lock:
            for key in held:
                if key not in self._lost:
                    self._confirmed[key] = max(self._confirmed.get(key, started), started)
        self._lose(losses)

    def confirm(self, connection: Connection, keys: Iterable[str]) -> None:
        """Renew the leases of ``keys`` first thing in ``connection``'s transaction, or raise
        FencedError for one no longer held: what the transaction goes on to write is then
        written only while they are held (the renewal's row lock on PostgreSQL, the write
        lock on SQLite, keep a taker out until it ends). For writes that decide what
        others send, as a plan superseding the pending changes of other runs does."""
        keys = set(keys)
        held = renew(connection, keys, self.owner, self.seconds)
        losses = describe_losses(connection, keys - held, self.owner)
        if losses:
            self._lose(losses)
            key, reason = next(iter(sorted(losses.items())))
            raise FencedError(key, reason)

    def check(self, keys: Iterable[str]) -> None:
        """Raise FencedError unless a request for ``keys`` may leave now."""
        now = self._monotonic()
        with self._lock:
            for key in keys:
                if key in self._lost:
                    raise FencedError(key, self._lost[key])
                confirmed = self._confirmed.get(key)
                if confirmed is None:
                    raise FencedError(key, f"{key}: no lease held")
                age = now - confirmed
                if age + self.request_seconds >= self.seconds:
                    raise FencedError(
                        key,
                        f"the lease of {key} was last confirmed {age:.1f} s ago: a request "
                        f"now ({self.request_seconds:g} s deadline) could outlast the "
                        f"{self.seconds:g} s lease",
                    )

    def loss(self) -> dict[str, str]:
        """The keys lost so far, with why."""
        with self._lock:
            return dict(self._lost)

    def start(self) -> None:
        """Start the heartbeat."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def release(self) -> None:
        """Give up every lease still held. When the database cannot record it, the leases
        stay live in it until they expire, for others; this owner takes them back at once."""
        with self._lock:
            keys = [k for k in self._confirmed if k not in self._lost]
            taken, self._taken = self._taken, set()
            self._confirmed.clear()
        try:
            release(self._engine, keys, self.owner)
        except (SQLAlchemyError, StateError) as exc:
            # Not worth failing a run whose work is saved, nor hiding why it failed.
            log.warning(
                "could not release the leases of %s: %s; other processes wait until they "
                "expire, this one takes them back at once",
                ", ".join(sorted(keys)), exc,
            )  # fmt: skip
        finally:
            with _holding_lock:
                _holding.difference_update((self._database, self.owner, k) for k in taken)

    def _lose(self, losses: dict[str, str]) -> None:
        if not losses:
            return
        with self._lock:
            fresh = {k: v for k, v in losses.items() if k not in self._lost}
            self._lost.update(fresh)
        for reason in fresh.values():
            log.error("%s", reason)
        self.lost.set()

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_seconds):
            with self._lock:
                keys = {k for k in self._confirmed if k not in self._lost}
            if not keys:
                continue
            try:
                with self.fenced(keys):
                    pass
            except (OperationalError, StateError) as exc:
                # A busy or briefly unreachable database: the next beat tries again; the
                # fence stops sending if none succeeds in time.
                log.warning("could not renew the leases of %s: %s", ", ".join(sorted(keys)), exc)


def holder_for(engine: Engine, owner: str, settings: Settings) -> Holder:
    """A ``Holder`` with the config's lease length, fencing requests of its timeout."""
    return Holder(
        engine,
        owner,
        seconds=settings.state.lease_seconds,
        request_seconds=settings.gist.timeout_seconds,
    )


@contextmanager
def fenced(
    engine: Engine, holder: Holder | None, keys: Iterable[str]
) -> Iterator[tuple[Connection, set[str]]]:
    """A transaction fenced on ``holder``'s leases of ``keys`` (``Holder.fenced``), or a plain
    one holding every key when there is no holder (a caller outside any run)."""
    if holder is not None:
        with holder.fenced(keys) as fenced_transaction:
            yield fenced_transaction
        return
    with engine.begin() as connection:
        yield connection, set(keys)


def describe_losses(connection: Connection, keys: Iterable[str], owner: str) -> dict[str, str]:
    """Why each of ``keys`` is no longer this owner's: taken over by whom, or expired."""
    keys = sorted(set(keys))
    if not keys:
        return {}
    holders = dict(
        connection.execute(
            select(leases.c.audience_key, leases.c.owner).where(leases.c.audience_key.in_(keys))
        ).all()
    )
    reasons = {}
    for key in keys:
        holder = holders.get(key)
        if holder is None or holder == owner:
            reasons[key] = f"{key}: lease expired before it was renewed"
        else:
            reasons[key] = f"{key}: lease taken over by {holder}"
    return reasons
