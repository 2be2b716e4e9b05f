"""What SIGTERM, SIGINT and SIGHUP mean while a command syncs: stop gracefully, then at once;
reload a daemon's config."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audience_sync.scheduler import Daemon

SignalHandler = Callable[[int, FrameType | None], None]
log = logging.getLogger(__package__)


class StopNow(KeyboardInterrupt):
    """A second signal while a sync stops gracefully: stop at once."""


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM, SIGHUP or Ctrl-C asks the run to stop gracefully; a second one stops it at
    once. (A hang-up no longer kills a run half-way, leaving it marked running.)"""
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise StopNow
        log.warning(
            "%s: finishing requests in flight, then stopping (again to stop now)",
            signal.Signals(signum).name,
        )
        stop.set()

    with signal_handlers({signal.SIGTERM: handle, signal.SIGINT: handle, signal.SIGHUP: handle}):
        yield stop


@contextmanager
def daemon_signals(daemon: Daemon) -> Iterator[None]:
    """SIGTERM/SIGINT stop the daemon after the running sync (a second one at once);
    SIGHUP reloads the config."""
    asked: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if asked:
            # The running sync is stuck (a source or the state database hangs): leave it.
            # Its run stays `running` until the next run marks it interrupted; what Gist
            # acknowledged is saved already.
            log.warning("%s again: stopping now, without waiting for the running sync", name)
            logging.shutdown()
            os._exit(128 + signum)
        asked.append(signum)
        log.warning("%s: stopping after the running sync (again to stop now)", name)
        daemon.request_stop()

    def reload(_signum: int, _frame: FrameType | None) -> None:
        log.warning("SIGHUP: reloading the config")
        daemon.reload()

    with signal_handlers({signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: reload}):
        yield


@contextmanager
def signal_handlers(handlers: dict[signal.Signals, SignalHandler]) -> Iterator[None]:
    """Install ``handlers`` for the length of the block (from the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
