"""Serving the pages: the bind rule, and uvicorn on a socket bound first (so a port in use
is one clear error and port 0 picks a free one), in the foreground or a background thread."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from audience_sync.errors import ConfigError
from audience_sync.web import PASSWORD_ENV

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` is an address only this machine reaches (``localhost`` included)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def check_bind(host: str, password: str | None) -> None:
    """Refuse (``ConfigError``) to serve anywhere but loopback without a password: the pages
    show every member's email."""
    if is_loopback(host) or password:
        return
    raise ConfigError(
        f"refusing to serve the history on {host}: it would show every member's email to "
        f"anyone who reaches that address. Set {PASSWORD_ENV} (HTTP basic auth, any user "
        "name) or keep the default --host 127.0.0.1 (and reach it through an SSH tunnel)"
    )


def allowed_hosts(host: str, password: str | None) -> set[str] | None:
    """The Host names a loopback server answers (another site's page cannot read it through
    DNS rebinding); None, any, when bound elsewhere behind a password."""
    if password and not is_loopback(host):
        return None
    return {*LOOPBACK_NAMES, host.strip("[]")}


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; ``ConfigError`` naming it when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` as ``sock`` is bound."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's server, stopping gracefully on SIGINT or SIGTERM and then exiting 0, as the
    daemon does (uvicorn's own handlers raise the signal again once stopped: exit -15)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # a background server (tests): its owner stops it
            return
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        # A second signal cuts the connections still open instead of waiting for them.
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def server(app: ASGIApp) -> uvicorn.Server:
    """A uvicorn server for ``app`` that leaves the program's logging as it is."""
    config = uvicorn.Config(
        app,
        log_config=None,  # keep audience-sync's own log lines, one format
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="off",
    )
    return _Server(config)


def serve(app: ASGIApp, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGINT or SIGTERM (uvicorn's graceful stop)."""
    server(app).run(sockets=[sock])


@contextmanager
def background(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a thread while the block runs; yields its URL (tests, benchmarks)."""
    sock = bind(host, port)
    running = server(app)
    thread = threading.Thread(
        target=running.run, kwargs={"sockets": [sock]}, name="ui-server", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not running.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        yield url_of(sock)
    finally:
        running.should_exit = True
        thread.join(10)
        sock.close()
