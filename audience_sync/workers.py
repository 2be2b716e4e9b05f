"""The processes that sync, in the ``workers`` table: who is alive and what each is running.

Every daemon, and every ``run``/``backfill``/``retire`` for as long as it syncs, keeps a row
whose ``heartbeat_at`` (the **database's** time, as leases use) it renews every
``BEAT_SECONDS`` from a thread, and whose ``running`` lists the audiences it holds. A row
whose heartbeat is older than the lease length belongs to a dead process (killed, or its
host gone): its leases have expired too, and the next worker to tick takes its audiences
over. A clean exit records ``stopped_at``.

Rows are deleted when a worker starts: a one-shot sync's (``run``, ``backfill``,
``retire``: cron starts ~100 a day) an hour after it stopped, any other's when it has been
gone for ``KEEP_DAYS``; ``prune`` deletes the rows of processes gone longer than its age.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Literal

from sqlalchemy import Engine, and_, case, delete, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from audience_sync import lease
from audience_sync.errors import StateError
from audience_sync.models import workers

log = logging.getLogger(__name__)

BEAT_SECONDS = 10.0
KEEP_DAYS = 7
STOP_RECORD_SECONDS = 5.0  # the longest a clean exit waits to record itself
ONE_SHOT_COMMANDS = ("run", "backfill", "retire", "verify")
ONE_SHOT_KEEP_SECONDS = 3600  # a finished one-shot sync's row, for `workers --all`
WorkerState = Literal["alive", "dead", "stopped"]


class Presence:
    """This process's row in ``workers``, kept alive while the ``with`` block runs."""

    def __init__(self, engine: Engine, command: str, worker_id: str | None = None) -> None:
        self._engine = engine
        self._command = command
        self.id = worker_id or lease.new_owner()
        self._running: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="worker-heartbeat", daemon=True)

    def __enter__(self) -> Presence:
        dialect = self._engine.dialect.name
        host, boot_id = lease.place()
        now = lease.database_now(dialect)
        with self._engine.begin() as connection:
            connection.execute(
                delete(workers).where(
                    or_(
                        workers.c.heartbeat_at < lease.database_now(dialect, -KEEP_DAYS * 86400),
                        and_(
                            workers.c.command.in_(ONE_SHOT_COMMANDS),
                            workers.c.stopped_at
                            < lease.database_now(dialect, -ONE_SHOT_KEEP_SECONDS),
                        ),
                    )
                )
            )
            connection.execute(
                workers.insert().values(
                    id=self.id,
                    host=host,
                    pid=os.getpid(),
                    boot_id=boot_id,
                    command=self._command,
                    started_at=now,
                    heartbeat_at=now,
                )
            )
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._wake.set()
        # A database that stopped answering must not hold the process: a beat stuck in it
        # is left behind, and the stop is recorded only if it is in time.
        deadline = time.monotonic() + STOP_RECORD_SECONDS
        self._thread.join(STOP_RECORD_SECONDS)
        recording = threading.Thread(target=self._record_stop, name="worker-stop", daemon=True)
        recording.start()
        recording.join(max(0.0, deadline - time.monotonic()))
        if recording.is_alive():
            log.warning(
                "could not record this worker's stop: the state database did not answer "
                "within %gs (its row shows it dead once its heartbeat is old)",
                STOP_RECORD_SECONDS,
            )

    def _record_stop(self) -> None:
        try:
            with self._engine.begin() as connection:
                now = lease.database_now(self._engine.dialect.name)
                connection.execute(
                    update(workers)
                    .where(workers.c.id == self.id)
                    .values(heartbeat_at=now, stopped_at=now, running=None)
                )
        except (SQLAlchemyError, StateError) as exc:  # the row ages into "dead": nothing lost
            log.warning("could not record this worker's stop: %s", exc)

    def running(self, keys: Iterable[str]) -> None:
        """Record that this process now syncs ``keys`` (empty: nothing)."""
        with self._lock:
            self._running = sorted(set(keys))
        self._wake.set()  # shown at once, not at the next beat

    def _beat(self) -> None:
        while True:
            self._wake.wait(BEAT_SECONDS)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                running = ",".join(self._running) or None
            try:
                with self._engine.begin() as connection:
                    connection.execute(
                        update(workers)
                        .where(workers.c.id == self.id)
                        .values(
                            heartbeat_at=lease.database_now(self._engine.dialect.name),
                            running=running,
                        )
                    )
            except (SQLAlchemyError, StateError) as exc:
                # A busy or briefly unreachable database: the next beat tries again.
                log.debug("worker heartbeat failed: %s", exc)


@dataclass(frozen=True)
class WorkerRow:
    """One worker as ``audience-sync workers`` shows it."""

    id: str
    host: str
    pid: int
    command: str
    state: WorkerState
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    running: list[str]
    seconds_since_heartbeat: float


def list_workers(engine: Engine) -> list[WorkerRow]:
    """Every worker still in the table, the live ones first, newest first within a state."""
    dialect = engine.dialect.name
    fresh = workers.c.heartbeat_at >= lease.database_now(dialect, -lease.LEASE_SECONDS)
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                workers,
                case((fresh, True), else_=False).label("fresh"),
                lease.database_now(dialect).label("now"),
            ).order_by(workers.c.started_at.desc(), workers.c.id)
        ).all()
    found = []
    for row in rows:
        state: WorkerState
        if row.stopped_at is not None:
            state = "stopped"
        elif row.fresh and not lease.is_dead_local_owner(row.id):
            state = "alive"
        else:
            state = "dead"
        found.append(
            WorkerRow(
                id=row.id,
                host=row.host,
                pid=row.pid,
                command=row.command,
                state=state,
                started_at=row.started_at,
                heartbeat_at=row.heartbeat_at,
                stopped_at=row.stopped_at,
                running=row.running.split(",") if row.running and state != "stopped" else [],
                seconds_since_heartbeat=_seconds(row.now, row.heartbeat_at),
            )
        )
    order = {"alive": 0, "dead": 1, "stopped": 2}
    return sorted(found, key=lambda w: order[w.state])


def prune_workers(engine: Engine, older_than_seconds: float, *, dry_run: bool = False) -> int:
    """Delete (``dry_run``: count) the rows of workers gone — stopped, or without a
    heartbeat for the lease length — whose last heartbeat is older than the given age."""
    dialect = engine.dialect.name
    gone = (
        or_(
            workers.c.stopped_at.is_not(None),
            workers.c.heartbeat_at < lease.database_now(dialect, -lease.LEASE_SECONDS),
        ),
        workers.c.heartbeat_at <= lease.database_now(dialect, -older_than_seconds),
    )
    with engine.begin() as connection:
        if dry_run:
            return connection.scalar(select(func.count()).where(*gone)) or 0
        return connection.execute(delete(workers).where(*gone)).rowcount


def _seconds(now: object, then: datetime) -> float:
    # SQLite hands the expression back as text; PostgreSQL as a datetime.
    moment = now if isinstance(now, datetime) else datetime.fromisoformat(str(now))
    return max(0.0, (moment - then).total_seconds())
