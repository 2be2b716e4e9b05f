"""Webhook alerts: who gets posted, the payload, and webhooks that fail without failing the sync."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import httpx
import pytest
from sqlalchemy import Engine, func, insert, select

from audience_sync.alerts import (
    Alert,
    AlertMemory,
    AlertSender,
    build_summary,
    redact_webhook_url,
    select_alerts,
    send_alerts,
)
from audience_sync.config import AlertsConfig
from audience_sync.models import audiences, sync_runs
from audience_sync.runs import result_fields
from audience_sync.statuses import RunStatus
from audience_sync.sync import RunResult
from tests.conftest import API_KEY, Workspace, write_members

TOKEN = "SECRET-tok3n"


def run(status: RunStatus, key: str = "vip", **fields: Any) -> RunResult:
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
    receiver: Receiver, statuses: list[RunStatus], always: bool, posted: list[str]
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
    assert body["runs"] == [
        {**result_fields(results[1]), "alert": "failing"},
        {**result_fields(results[2]), "alert": "failing"},
    ]
    assert set(body["runs"][0]) == {
        "audience_key", "name", "kind", "status", "run_id", "source_rows", "members",
        "entered", "exited", "delivered", "failed", "rejected", "error", "failure", "resent",
        "email_conflicts", "staged_in", "fast_path", "alert",
    }  # fmt: skip
    assert body["worst_status"] == "guarded"
    assert "churned failing (partial): 2 changes failed" in body["text"]
    assert "news failing (guarded)" in body["text"]


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
    # "mystery": a status a newer version might write; it must rank, not crash.
    alerts = [Alert(run(cast(RunStatus, s)), "failing") for s in statuses]
    assert build_summary(alerts)["worst_status"] == worst


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
    assert_warned_without_secrets(caplog, f"{receiver.base}/… did not answer within 0.2s")


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


def test_an_unusable_url_is_refused_with_the_config(caplog: pytest.LogCaptureFixture) -> None:
    """Accepted before, and every alert then lost with a warning (tests/test_config.py
    checks the message names the key)."""
    with pytest.raises(ValueError, match="must be an http"):
        config(f"ftp://hooks.example.com/{TOKEN}")


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


class RawWebhook:
    """A loopback webhook written on bare sockets, to answer as badly as a real one can:
    ``trickle`` sends the status line one byte every ``gap`` seconds; ``flood`` answers 200
    with an endless body. Either way it gives up after ``limit`` seconds."""

    def __init__(self, mode: str, gap: float = 0.5, limit: float = 15.0) -> None:
        self.mode = mode
        self.gap = gap
        self.limit = limit
        self.sent = 0
        self.connections = 0
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook/{TOKEN}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        started = time.monotonic()
        with conn:
            conn.settimeout(self.limit)
            conn.recv(65536)  # the request (small enough for one read on loopback)
            try:
                if self.mode == "trickle":
                    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                        if self.stop.wait(self.gap) or time.monotonic() - started > self.limit:
                            return
                        conn.sendall(bytes([byte]))
                        self.sent += 1
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
                    while not self.stop.is_set() and time.monotonic() - started < self.limit:
                        conn.sendall(chunk)
                        self.sent += len(chunk)
            except OSError:
                return  # the client hung up: what a bounded client does

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def raw_webhook() -> Iterator[Any]:
    made: list[RawWebhook] = []

    def make(mode: str, **options: Any) -> RawWebhook:
        made.append(RawWebhook(mode, **options))
        return made[-1]

    yield make
    for hook in made:
        hook.close()


def test_a_trickling_webhook_is_cut_off_at_the_total_deadline(
    raw_webhook: Any, caplog: pytest.LogCaptureFixture
) -> None:
    hook = raw_webhook("trickle", gap=0.3)  # each byte well within httpx's per-read timeout

    started = time.monotonic()
    sent = send_alerts(config(hook.url, timeout=1.0), [run("failed")])
    elapsed = time.monotonic() - started

    assert sent is False
    assert elapsed < 3.0, f"the alert took {elapsed:.1f}s with a 1s deadline"
    assert 0 < hook.sent < 20  # it was talking, and was cut off mid-answer
    assert "did not answer within 1s" in caplog.text
    assert TOKEN not in caplog.text


def test_an_endless_answer_is_not_read_to_the_end(raw_webhook: Any) -> None:
    hook = raw_webhook("flood")

    started = time.monotonic()
    sent = send_alerts(config(hook.url, timeout=10.0), [run("failed")])
    elapsed = time.monotonic() - started

    assert sent is True  # the status is all an alert needs
    assert elapsed < 5.0, f"reading the answer took {elapsed:.1f}s"
    time.sleep(0.2)  # let the server notice the hang-up
    assert hook.sent < 64 * 2**20  # what the socket buffers held, not the whole flood


class Runs:
    """Writes ``sync_runs`` rows of one audience as runs would, one minute apart."""

    def __init__(self, engine: Engine, key: str = "vip") -> None:
        self.engine = engine
        self.key = key
        self.at = datetime(2026, 1, 1, 0, 0)

    def add(self, status: str, *, minutes: float = 1.0, kind: str = "run") -> RunResult:
        self.at += timedelta(minutes=minutes)
        with self.engine.begin() as connection:
            if not connection.scalar(select(func.count()).where(audiences.c.key == self.key)):
                connection.execute(insert(audiences).values(key=self.key, name="VIP", source="x"))
            run_id = connection.execute(
                insert(sync_runs)
                .values(
                    audience_key=self.key, kind=kind, status=status, started_at=self.at,
                    finished_at=self.at, source_rows=0, members=0, entered=0, exited=0,
                    delivered=0, failed=0, rejected=0,
                )
                .returning(sync_runs.c.id)
            ).scalar_one()  # fmt: skip
        return RunResult(self.key, "VIP", kind, status, run_id=run_id)  # type: ignore[arg-type]


def events(
    engine: Engine, history: Runs, statuses: list[str], memory: AlertMemory | None = None,
    **options: Any,
) -> list[str | None]:  # fmt: skip
    """Each run's alert (None: not posted), each decided as its own ``run`` would decide."""
    found: list[str | None] = []
    cfg = AlertsConfig(webhook_url="http://127.0.0.1:9/hook", **options)
    for status in statuses:
        result = history.add(status)
        chosen = select_alerts(cfg, [result], engine, memory)
        found.append(chosen[0].event if chosen else None)
    return found


def test_alerts_go_out_on_a_change_of_state_not_on_every_failure(engine: Engine) -> None:
    statuses = ["succeeded", "failed", "failed", "partial", "succeeded", "succeeded", "guarded"]
    assert events(engine, Runs(engine), statuses) == [
        None, "failing", None, None, "recovered", None, "failing",
    ]  # fmt: skip


def test_a_first_run_that_fails_alerts_and_one_that_succeeds_does_not(engine: Engine) -> None:
    assert events(engine, Runs(engine, "a"), ["failed"]) == ["failing"]
    assert events(engine, Runs(engine, "b"), ["succeeded"]) == [None]


def test_two_hundred_thirty_failures_alert_once(engine: Engine) -> None:
    history = Runs(engine)
    found = [
        e for e in (events(engine, history, ["failed"])[0] for _ in range(230)) if e is not None
    ]
    assert found == ["failing"]


def test_a_long_failure_is_reminded_every_remind_every(engine: Engine) -> None:
    history = Runs(engine)
    found = []
    for _ in range(30):  # one failing run every 10 minutes for 5 hours
        result = history.add("failed", minutes=10)
        chosen = select_alerts(
            AlertsConfig(webhook_url="http://127.0.0.1:9/hook", remind_every="2h"),
            [result],
            engine,
        )
        found.append((history.at.strftime("%H:%M"), chosen[0].event) if chosen else None)
    assert [f for f in found if f] == [("00:10", "failing"), ("02:10", "reminder"),
                                       ("04:10", "reminder")]  # fmt: skip


def test_dry_runs_do_not_count_as_history(engine: Engine) -> None:
    history = Runs(engine)
    history.add("failed")
    history.add("succeeded", kind="dry-run")
    assert events(engine, history, ["failed"]) == [None]  # still the same failure


def test_always_posts_every_run_with_its_event(engine: Engine) -> None:
    assert events(engine, Runs(engine), ["succeeded", "failed", "failed", "succeeded"],
                  always=True) == ["ok", "failing", "still failing", "recovered"]  # fmt: skip


def test_without_run_ids_this_process_remembers_what_it_said() -> None:
    memory = AlertMemory()
    cfg = AlertsConfig(webhook_url="http://127.0.0.1:9/hook")
    outage = RunResult("vip", "VIP", "run", "failed", error="state database is down")
    found = [select_alerts(cfg, [outage], None, memory) for _ in range(5)]
    assert [[a.event for a in f] for f in found] == [["failing"], [], [], [], []]
    back = select_alerts(cfg, [RunResult("vip", "VIP", "run", "succeeded", run_id=7)], None, memory)
    assert [a.event for a in back] == ["recovered"]


def test_the_sender_posts_off_the_calling_thread_and_closes_in_bounded_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    posted: list[list[str]] = []

    def post(cfg: AlertsConfig, alerts: Any) -> bool:
        posted.append([a.result.audience_key for a in alerts])
        release.wait(10)
        return True

    sender = AlertSender(lambda: AlertsConfig(webhook_url="http://x/"), post)
    started = time.monotonic()
    sender.submit([Alert(run("failed", key="a"), "failing")])
    sender.submit([Alert(run("failed", key="b"), "failing")])
    assert time.monotonic() - started < 0.5  # submitting never waits for the webhook
    assert sender.close(timeout=0.3) is False
    assert time.monotonic() - started < 2.0
    assert posted == [["a"]]
    assert "not sent for: b" in caplog.text
    release.set()


def test_the_sender_closes_at_once_when_everything_was_posted() -> None:
    posted: list[str] = []

    def post(config: AlertsConfig, alerts: Sequence[Alert]) -> bool:
        posted.append(alerts[0].result.audience_key)
        return True

    sender = AlertSender(lambda: AlertsConfig(webhook_url="http://x/"), post)
    sender.submit([Alert(run("failed", key="a"), "failing")])
    assert sender.close(timeout=5) is True
    assert posted == ["a"]


def test_the_python_api_alerts_like_run_does(
    workspace: Workspace, engine: Engine, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``audience_sync.run()`` with a wrong key returned ``failed`` and posted nothing, and
    the next CLI run, seeing the audience already failing, posted nothing either."""
    import audience_sync
    from audience_sync.cli import run_cli

    workspace.sections["alerts"] = {"webhook_url": receiver.url}
    write_members(workspace.add_file_audience("VIP"), range(2))

    [failed] = audience_sync.run(workspace.config_path, environ={"GIST_API_KEY": "wrong"})

    assert failed.status == "failed"
    [post] = receiver.posts
    assert [a["status"] for a in post["body"]["runs"]] == ["failed"]
    monkeypatch.setenv("GIST_API_KEY", "wrong")
    assert run_cli(["run", "--config", str(workspace.config_path)]) == 1
    assert len(receiver.posts) == 1  # still failing: no news
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    assert run_cli(["run", "--config", str(workspace.config_path)]) == 0
    assert [a["status"] for a in receiver.posts[-1]["body"]["runs"]] == ["succeeded"]
