"""How a supervisor sees that the daemon lives: its heartbeat file and its health rule."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audience_sync.statuses import FAILED_STATUSES

if TYPE_CHECKING:
    from audience_sync.sync import Progress

__all__ = ["HeartbeatFile", "Signs", "StateWatch", "SyncProgress", "assess"]

log = logging.getLogger(__name__)

STATE_CHECK_SECONDS = 5.0  # the pause between two checks of the state database
STATE_PATIENCE_SECONDS = 10.0  # a check unanswered this long makes the daemon unhealthy


class HeartbeatFile:
    """The daemon's heartbeat file: JSON rewritten atomically, for a supervisor to watch.

    (Not the lease heartbeat of ``lease.Heartbeat``, which renews leases in the database.)
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, body: dict[str, Any]) -> None:
        """Replace the file with ``body``; a failure is logged, never raised."""
        path = self.path
        if path is None:
            return
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
            os.replace(temporary, path)  # readers never see a half-written file
        except OSError as exc:
            log.warning("cannot write heartbeat file %s: %s", path, exc)

    def move_to(self, path: Path | None) -> None:
        """Write from now on to ``path``; the old file goes, so nobody watches a stale one."""
        old = self.path
        if path == old:
            return
        self.path = path
        if old is not None:
            with suppress(FileNotFoundError):
                old.unlink()
            log.info("heartbeat file moved from %s to %s", old, path or "(none)")


class SyncProgress:
    """A ``sync.Progress`` that notes that the sync thread is moving, and passes each step
    on to ``also`` (the daemon's progress log lines)."""

    def __init__(self, touch: Callable[[], None], also: Progress | None = None) -> None:
        self._touch = touch
        self._also = also

    def loaded(self, audience_key: str, rows: int) -> None:
        self._touch()
        if self._also is not None:
            self._also.loaded(audience_key, rows)

    def planned(self, changes: int) -> None:
        self._touch()
        if self._also is not None:
            self._also.planned(changes)

    def sent(self, changes: int) -> None:
        self._touch()
        if self._also is not None:
            self._also.sent(changes)


@dataclass(frozen=True)
class Signs:
    """What the daemon knows about itself at ``now``."""

    now: datetime
    tick_at: datetime | None  # the scheduler loop's last heartbeat job (None: not serving)
    progress_at: datetime | None  # the running sync's last sign of life (None: idle)
    running: list[str]  # keys being synced
    keys: list[str]  # scheduled audiences
    # The latest statuses the last check of the state database read, or why it could not
    # read them (None: no check has ended yet, or none is made).
    recent: dict[str, list[str]] | str | None
    unanswered_since: datetime | None = None  # a check sent then still waits for an answer


class StateWatch:
    """The daemon's own periodic check of the state database: ``/healthz`` answers from what
    it last learnt, so no request ever waits on the database (one that stopped answering
    would hold every probe, and the daemon's stop, for as long as the network drops packets).

    ``read`` is the check (the latest statuses of the scheduled audiences); ``describe``
    says in one line, without SQL or parameters, why it failed; outages are logged, with
    their end, to ``logger``.
    """

    def __init__(
        self,
        read: Callable[[], dict[str, list[str]]],
        clock: Callable[[], datetime],
        describe: Callable[[BaseException], str],
        logger: logging.Logger = log,
    ) -> None:
        self._log = logger
        self._read = read
        self._clock = clock
        self._describe = describe
        self._lock = threading.Lock()
        self._recent: dict[str, list[str]] | str | None = None
        self._since: datetime | None = None
        self._troubled = False  # an outage was logged; its end will be too

    def seen(self) -> tuple[dict[str, list[str]] | str | None, datetime | None]:
        """The last check's answer (or why it failed) and since when a check has been waiting."""
        with self._lock:
            return self._recent, self._since

    def check(self) -> None:
        """Check once, in the calling thread; logs the start and the end of an outage."""
        with self._lock:
            self._since = self._clock()
        recent: dict[str, list[str]] | str
        try:
            recent = self._read()
        except Exception as exc:  # whatever the read raises, the database did not answer
            recent = self._describe(exc)
        with self._lock:
            self._since = None
            self._recent = recent
            troubled, self._troubled = self._troubled, isinstance(recent, str)
        if isinstance(recent, str) and not troubled:
            self._log.warning(
                "the state database cannot be reached (%s); /healthz answers 503", recent
            )
        elif troubled and not isinstance(recent, str):
            self._log.info("the state database answers again")

    def watch(
        self,
        stop: threading.Event,
        *,
        every: float = STATE_CHECK_SECONDS,
        patience: float = STATE_PATIENCE_SECONDS,
    ) -> None:
        """Check every ``every`` seconds until ``stop`` is set. Each check runs in a thread
        of its own: one the database never answers is logged after ``patience`` seconds and
        waited for, and no second one is sent meanwhile."""
        while not stop.is_set():
            checking = threading.Thread(target=self.check, name="state-check", daemon=True)
            began = time.monotonic()
            checking.start()
            while checking.is_alive() and not stop.is_set():
                checking.join(0.2)
                if checking.is_alive() and time.monotonic() - began >= patience:
                    with self._lock:
                        troubled, self._troubled = self._troubled, True
                    if not troubled:
                        self._log.warning(
                            "the state database has not answered for %gs (a network partition, "
                            "or a database that hangs); /healthz answers 503 until it does",
                            patience,
                        )
            stop.wait(every)


def assess(
    signs: Signs,
    *,
    stall_seconds: int,
    failed_runs: int,
    patience_seconds: float = STATE_PATIENCE_SECONDS,
) -> tuple[bool, dict[str, Any]]:
    """The health rule behind ``/healthz``: unhealthy (with the reasons) when

    - the scheduler loop has not run its heartbeat job, or a running sync has shown no
      progress (rows read, answers from Gist), for ``stall_seconds``;
    - the state database cannot be reached, or a check of it has waited for an answer
      longer than ``patience_seconds``;
    - the latest ``failed_runs`` runs of every scheduled audience failed (an audience with
      fewer runs than that counts as healthy).
    """
    stall = timedelta(seconds=stall_seconds)
    reasons: list[str] = []
    if signs.tick_at is not None and signs.now - signs.tick_at > stall:
        quiet = (signs.now - signs.tick_at).total_seconds()
        reasons.append(f"the scheduler loop has not ticked for {quiet:.0f}s")
    if signs.progress_at is not None and signs.now - signs.progress_at > stall:
        quiet = (signs.now - signs.progress_at).total_seconds()
        what = f" (syncing {', '.join(signs.running)})" if signs.running else ""
        reasons.append(f"the scheduler thread has made no progress for {quiet:.0f}s{what}")
    recent = signs.recent
    waited = (signs.now - signs.unanswered_since).total_seconds() if signs.unanswered_since else 0
    if waited > patience_seconds:
        reasons.append(f"the state database has not answered for {waited:.0f}s")
    elif isinstance(recent, str):
        reasons.append(f"the state database cannot be reached: {recent}")
    elif (
        recent is not None
        and signs.keys
        and all(
            len(recent.get(k, [])) >= failed_runs
            and all(status in FAILED_STATUSES for status in recent[k])
            for k in signs.keys
        )
    ):
        reasons.append(f"the last {failed_runs} runs of every audience failed")
    info: dict[str, Any] = {
        "status": "unhealthy" if reasons else "ok",
        "audiences": signs.keys,
        "running": signs.running,
    }
    if reasons:
        info["reasons"] = reasons
    return not reasons, info
