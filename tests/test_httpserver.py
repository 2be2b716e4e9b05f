"""The shared background HTTP server: one lifecycle for the fake Gist and the metrics server."""

from __future__ import annotations

import socket
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from audience_sync.fakegist import FakeGist
from audience_sync.httpserver import BackgroundServer, JoiningHTTPServer
from audience_sync.metrics import Metrics, MetricsServer


class _Hello(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")


class Hello(BackgroundServer):
    def _make_server(self, address: tuple[str, int]) -> JoiningHTTPServer:
        return JoiningHTTPServer(address, _Hello)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_serves_stops_and_frees_the_port() -> None:
    with Hello("127.0.0.1", 0) as server:
        url = server.url
        assert httpx.get(url).text == "hello"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_host_is_bracketed_in_the_url() -> None:
    with Hello("::1", 0) as server:
        assert server.url.startswith("http://[::1]:")
        assert httpx.get(server.url).text == "hello"


def test_a_taken_port_raises_oserror_and_leaves_it_unstarted() -> None:
    with Hello("127.0.0.1", 0) as first:
        port = int(first.url.rsplit(":", 1)[1])
        second = Hello("127.0.0.1", port)
        with pytest.raises(OSError, match=r"[Aa]ddress already in use"):
            second.start()
        with pytest.raises(RuntimeError, match="not started"):
            _ = second.url


@pytest.mark.parametrize(
    "make",
    [lambda: FakeGist("k"), lambda: MetricsServer(Metrics(), "127.0.0.1", 0, lambda: (True, {}))],
    ids=["fakegist", "metrics"],
)
def test_fakegist_and_metrics_share_the_lifecycle(make: object) -> None:
    server = make()  # type: ignore[operator]
    assert isinstance(server, BackgroundServer)
    with server:
        assert server.url.startswith("http://127.0.0.1:")
