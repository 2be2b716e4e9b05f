"""Webhook alerts: who gets posted, the payload, and webhooks that fail without failing the sync."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import httpx
import pytest

from audience_sync.alerts import build_summary, redact_webhook_url, send_alerts
from audience_sync.config import AlertsConfig
from audience_sync.sync import RunResult

TOKEN = "SECRET-tok3n"


def run(status: str, key: str = "vip", **fields: Any) -> RunResult:
    return RunResult(key, key.upper(), "run", status, run_id=1, **fields)


class _Receiver(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close joins handler threads: no socket left behind

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out and hung up is expected here."""


class _ReceiverHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        server = cast(_Receiver, self.server)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server.posts.append(
            {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
        )
        if server.delay:
            server.release.wait(server.delay)
        self.send_response(server.status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


class Receiver:
    """A webhook on loopback that records every POSTed JSON body."""

    def __init__(self, server: _Receiver) -> None:
        self._server = server
        port = server.server_address[1]
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/hooks/alerts?token={TOKEN}"

    @property
    def posts(self) -> list[dict[str, Any]]:
        return self._server.posts

    def answer(self, status: int = 200, delay: float = 0.0) -> None:
        self._server.status = status
        self._server.delay = delay


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = _Receiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Receiver(server)
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join()


def config(url: str | None, *, always: bool = False, timeout: float = 2.0) -> AlertsConfig:
    return AlertsConfig(webhook_url=url, always=always, timeout_seconds=timeout)


@pytest.mark.parametrize(
    ("statuses", "always", "posted"),
    [
        (["succeeded", "succeeded"], False, []),
        (["succeeded", "failed"], False, ["failed"]),
        (["guarded"], False, ["guarded"]),
        (["partial", "succeeded", "interrupted"], False, ["partial", "interrupted"]),
        (["skipped"], False, []),
        ([], False, []),
        (["succeeded", "skipped"], True, ["succeeded", "skipped"]),
        (["succeeded", "partial"], True, ["succeeded", "partial"]),
        ([], True, []),
    ],
    ids=[
        "all-succeeded",
        "failed-only",
        "guarded",
        "partial-and-interrupted",
        "skipped-is-no-alert",
        "no-runs",
        "always-posts-successes",
        "always-posts-everything",
        "always-but-no-runs",
    ],
)
def test_posts_only_runs_that_need_a_human(
    receiver: Receiver, statuses: list[str], always: bool, posted: list[str]
) -> None:
    results = [run(status, key=f"a{i}") for i, status in enumerate(statuses)]

    sent = send_alerts(config(receiver.url, always=always), results)

    assert sent is bool(posted)
    if not posted:
        assert receiver.posts == []
        return
    [post] = receiver.posts
    assert [r["status"] for r in post["body"]["runs"]] == posted


def test_payload_shape(receiver: Receiver) -> None:
    results = [
        run("succeeded", key="vip", members=10, delivered=10),
        run("partial", key="churned", members=7, delivered=5, failed=2, error="2 changes failed"),
        run("guarded", key="news", members=300, exited=200, error="would remove 200 of 300"),
    ]

    assert send_alerts(config(receiver.url), results) is True

    [post] = receiver.posts
    assert post["path"] == f"/hooks/alerts?token={TOKEN}"
    assert post["headers"]["Content-Type"] == "application/json"
    assert post["headers"]["User-Agent"] == "audience-sync"
    body = post["body"]
    assert set(body) == {"tool", "host", "runs", "worst_status", "text"}
    assert body["tool"] == "audience-sync"
    assert body["host"] == socket.gethostname()
    assert body["runs"] == [asdict(results[1]), asdict(results[2])]
    assert set(body["runs"][0]) == {
        "audience_key", "name", "kind", "status", "run_id", "source_rows", "members",
        "entered", "exited", "delivered", "failed", "rejected", "error", "resent",
        "email_conflicts",
    }  # fmt: skip
    assert body["worst_status"] == "guarded"
    assert "churned partial (2 changes failed)" in body["text"]
    assert "news guarded" in body["text"]


@pytest.mark.parametrize(
    ("statuses", "worst"),
    [
        (["succeeded"], "succeeded"),
        (["succeeded", "skipped"], "skipped"),
        (["partial", "succeeded"], "partial"),
        (["partial", "guarded"], "guarded"),
        (["failed", "interrupted", "guarded"], "failed"),
        (["interrupted", "partial"], "interrupted"),
        (["succeeded", "mystery"], "mystery"),
        ([], None),
    ],
    ids=["one", "skipped", "partial", "guarded", "failed", "interrupted", "unknown", "empty"],
)
def test_worst_status(statuses: list[str], worst: str | None) -> None:
    assert build_summary([run(s) for s in statuses])["worst_status"] == worst


def test_no_webhook_configured_does_nothing() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    sent = send_alerts(config(None), [run("failed")], transport=httpx.MockTransport(handler))
    assert sent is False


def test_mock_transport_gets_the_summary() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    url = "https://hooks.example.com/services/T0/B0/" + TOKEN
    assert send_alerts(config(url), [run("failed")], transport=httpx.MockTransport(handler))
    [request] = seen
    assert request.method == "POST"
    assert str(request.url) == url
    assert json.loads(request.content)["runs"][0]["status"] == "failed"


def assert_warned_without_secrets(caplog: pytest.LogCaptureFixture, shown: str) -> None:
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.name for r in warnings] == ["audience_sync.alerts"]
    assert shown in warnings[0].getMessage()
    assert TOKEN not in caplog.text
    assert "s3cr3t" not in caplog.text


def secret_url(base: str) -> str:
    """``base`` (http://host:port) with a token in the userinfo, the path and the query."""
    scheme, rest = base.split("://")
    return f"{scheme}://hook:s3cr3t@{rest}/services/{TOKEN}?token={TOKEN}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_webhook_down_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    base = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more

    assert send_alerts(config(secret_url(base)), [run("failed")]) is False

    assert_warned_without_secrets(caplog, f"{base}/…")
    assert "ConnectError" in caplog.text


def test_webhook_500_is_logged_not_raised(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.answer(500)

    assert send_alerts(config(secret_url(receiver.base)), [run("guarded")]) is False

    assert len(receiver.posts) == 1
    assert_warned_without_secrets(caplog, f"{receiver.base}/… answered HTTP 500")


def test_webhook_timeout_is_logged_not_raised(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.answer(200, delay=5.0)  # released at teardown

    sent = send_alerts(config(secret_url(receiver.base), timeout=0.2), [run("partial")])

    assert sent is False
    assert_warned_without_secrets(caplog, f"{receiver.base}/…")
    assert "ReadTimeout" in caplog.text


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("cannot reach https://hook:s3cr3t@hooks.example.com/x?token=" + TOKEN),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        RuntimeError("not even an httpx error"),
    ],
    ids=["connect-error-quoting-the-url", "timeout", "disconnected", "unexpected"],
)
def test_transport_errors_are_logged_not_raised(
    failure: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise failure

    url = f"https://hook:s3cr3t@hooks.example.com/x?token={TOKEN}"
    sent = send_alerts(config(url), [run("failed")], transport=httpx.MockTransport(handler))

    assert sent is False
    assert_warned_without_secrets(caplog, "https://hooks.example.com/…")
    assert type(failure).__name__ in caplog.text


@pytest.mark.parametrize(
    "status", [302, 400, 404, 500, 503], ids=["redirect", "400", "404", "500", "503"]
)
def test_non_2xx_answers_are_logged_not_raised(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(status))
    url = f"https://hooks.example.com/services/{TOKEN}"

    assert send_alerts(config(url), [run("failed")], transport=transport) is False

    assert_warned_without_secrets(caplog, f"https://hooks.example.com/… answered HTTP {status}")


def test_unusable_url_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    assert send_alerts(config(f"ftp://hooks.example.com/{TOKEN}"), [run("failed")]) is False
    assert_warned_without_secrets(caplog, "ftp://hooks.example.com/…")


def test_httpx_request_log_never_shows_the_token(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # what -vv shows

    assert send_alerts(config(secret_url(receiver.base)), [run("failed")]) is True

    [request_line] = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert f"POST {receiver.base}/… " in request_line
    assert TOKEN not in caplog.text
    assert "s3cr3t" not in caplog.text
    assert logging.getLogger("httpx").filters == []  # the redaction was scoped to the call


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T0/B0/" + TOKEN, "https://hooks.slack.com/…"),
        (f"https://user:{TOKEN}@alerts.example.com:8443/hook", "https://alerts.example.com:8443/…"),
        (f"http://127.0.0.1:9000/?token={TOKEN}", "http://127.0.0.1:9000/…"),
        ("https://alerts.example.com", "https://alerts.example.com"),
        ("https://alerts.example.com/", "https://alerts.example.com"),
        ("http://[::1]:8080/x", "http://[::1]:8080/…"),
        ("not a url", "<unparseable URL>"),
        ("http://host:99999999/", "<unparseable URL>"),
    ],
    ids=["slack-path", "userinfo-port", "query", "bare", "root", "ipv6", "garbage", "bad-port"],
)
def test_redact_webhook_url(url: str, shown: str) -> None:
    assert redact_webhook_url(url) == shown
