"""A threaded HTTP server run from a background thread: bind, serve, stop, as a context manager.

Shared by the fake Gist and the daemon's ``/metrics`` + ``/healthz`` server, so both start,
report their URL and stop (joining every handler thread, leaving no socket behind) one way.
"""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self, cast

__all__ = ["BackgroundServer", "JoiningHTTPServer"]

log = logging.getLogger(__name__)


class JoiningHTTPServer(ThreadingHTTPServer):
    """A threading server whose ``server_close`` joins its handler threads.

    ``host`` decides the address family, so ``::1`` binds IPv6.
    """

    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up early (scrapers, timed-out callers) are not worth a traceback.
        log.debug("request from %s failed", client_address, exc_info=True)


class BackgroundServer:
    """Serves a :class:`JoiningHTTPServer` from a daemon thread; port 0 picks a free port.

    Subclasses build the server in :meth:`_make_server` and may cut live connections in
    :meth:`_before_close`.
    """

    thread_name = "http-server"

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._server: JoiningHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _make_server(self, address: tuple[str, int]) -> JoiningHTTPServer:
        raise NotImplementedError

    def _before_close(self, server: JoiningHTTPServer) -> None:
        """Called after the serving loop stopped, before the socket closes."""

    @property
    def url(self) -> str:
        """``http://host:port`` as bound (the real port when 0 was asked for)."""
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        host, port = cast(tuple[str, int], self._server.server_address[:2])
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> Self:
        """Bind and serve in a daemon thread; returns self. ``OSError`` when it cannot bind."""
        if self._server is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        server = self._make_server((self.host, self.port))
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=self.thread_name,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wait for requests in progress and close the socket; idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        self._before_close(server)
        server.server_close()  # joins handler threads
        if thread is not None:
            thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
