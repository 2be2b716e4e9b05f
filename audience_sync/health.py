"""How a supervisor sees that the daemon lives: its heartbeat file and its health rule."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from audience_sync.statuses import FAILED_STATUSES

__all__ = ["HeartbeatFile", "Signs", "SyncProgress", "assess"]

log = logging.getLogger(__name__)


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
    """A ``sync.Progress`` that only notes that the sync thread is moving."""

    def __init__(self, touch: Callable[[], None]) -> None:
        self._touch = touch

    def loaded(self, audience_key: str, rows: int) -> None:
        self._touch()

    def planned(self, changes: int) -> None:
        self._touch()

    def sent(self, changes: int) -> None:
        self._touch()


@dataclass(frozen=True)
class Signs:
    """What the daemon knows about itself at ``now``."""

    now: datetime
    tick_at: datetime | None  # the scheduler loop's last heartbeat job (None: not serving)
    progress_at: datetime | None  # the running sync's last sign of life (None: idle)
    running: list[str]  # keys being synced
    keys: list[str]  # scheduled audiences
    recent: dict[str, list[str]] | Exception | None  # latest statuses, or why they could not
    # be read (None: not asked)


def assess(signs: Signs, *, stall_seconds: int, failed_runs: int) -> tuple[bool, dict[str, Any]]:
    """The health rule behind ``/healthz``: unhealthy (with the reasons) when

    - the scheduler loop has not run its heartbeat job, or a running sync has shown no
      progress (rows read, answers from Gist), for ``stall_seconds``;
    - the state database cannot be reached;
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
    if isinstance(recent, Exception):
        reasons.append(f"the state database cannot be reached: {type(recent).__name__}")
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
