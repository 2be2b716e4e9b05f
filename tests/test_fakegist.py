"""Tests for the fake Gist HTTP server, spoken to over real loopback HTTP."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from audience_sync.fakegist import DEFAULT_KEY, FakeGist
from tests.conftest import run_process
from tests.helpers import FakeGistExitedError, fake_gist_process

API_KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Building an SSL context per httpx.Client is slow; plain-HTTP tests share one.
_TLS = ssl.create_default_context()


def _client(gist: FakeGist, headers: dict[str, str] | None = None) -> httpx.Client:
    return httpx.Client(
        base_url=gist.url, headers=AUTH if headers is None else headers, timeout=10.0, verify=_TLS
    )


@pytest.fixture
def gist() -> Iterator[FakeGist]:
    with FakeGist(API_KEY) as server:
        yield server


@pytest.fixture
def client(gist: FakeGist) -> Iterator[httpx.Client]:
    with _client(gist) as c:
        yield c


def _contact(user_id: str, **props: Any) -> dict[str, Any]:
    return {"user_id": user_id, "email": f"{user_id}@example.com", "custom_properties": props}


def test_url_is_loopback(gist: FakeGist) -> None:
    assert gist.url.startswith("http://127.0.0.1:")
    assert not gist.url.endswith(":0")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}],
    ids=["missing", "wrong-key", "no-bearer"],
)
def test_auth_required(gist: FakeGist, headers: dict[str, str]) -> None:
    with _client(gist, headers) as c:
        resp = c.post("/contacts", json=_contact("1", a=True))
    assert resp.status_code == 401
    assert resp.json() == {"errors": [{"message": "Unauthorized"}]}
    assert gist.contacts() == {}
    assert [r.status for r in gist.requests()] == [401]


def test_post_contact_creates_then_merges(gist: FakeGist, client: httpx.Client) -> None:
    first = client.post("/contacts", json=_contact("42", in_a=True))
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    body = first.json()["contact"]
    assert isinstance(body["id"], int)
    assert body["user_id"] == "42"
    assert body["custom_properties"] == {"in_a": True}

    second = client.post("/contacts", json={"user_id": "42", "custom_properties": {"in_b": False}})
    assert second.status_code == 200
    assert second.json()["contact"]["id"] == body["id"]
    assert gist.contacts() == {
        "42": {
            "user_id": "42",
            "email": "42@example.com",
            "custom_properties": {"in_a": True, "in_b": False},
        }
    }
    assert gist.properties("in_b") == {"42": False}
    assert gist.properties("missing") == {}
    assert [r.path for r in gist.requests("/contacts")] == ["/contacts", "/contacts"]


def test_contact_matched_by_email_without_user_id(gist: FakeGist, client: httpx.Client) -> None:
    client.post("/contacts", json={"email": "x@example.com", "custom_properties": {"a": 1}})
    client.post("/contacts", json={"email": "x@example.com", "custom_properties": {"b": 2}})
    assert gist.contacts() == {
        "x@example.com": {
            "user_id": None,
            "email": "x@example.com",
            "custom_properties": {"a": 1, "b": 2},
        }
    }


@pytest.mark.parametrize(
    "content",
    [b"", b"{}", b"not json", b'{"custom_properties": {"a": true}}', b"[1, 2]"],
    ids=["empty", "empty-object", "invalid-json", "no-identity", "not-object"],
)
def test_post_contact_bad_request(gist: FakeGist, client: httpx.Client, content: bytes) -> None:
    resp = client.post("/contacts", content=content, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert "errors" in resp.json()
    assert gist.contacts() == {}


def test_batch(gist: FakeGist, client: httpx.Client) -> None:
    resp = client.post(
        "/contacts/batch", json={"contacts": [_contact("1", a=True), _contact("2", a=False)]}
    )
    assert resp.status_code == 200
    assert [c["user_id"] for c in resp.json()["contacts"]] == ["1", "2"]
    assert gist.properties("a") == {"1": True, "2": False}


def test_batch_with_invalid_item_applies_none(gist: FakeGist, client: httpx.Client) -> None:
    resp = client.post(
        "/contacts/batch", json={"contacts": [_contact("1", a=True), {"custom_properties": {}}]}
    )
    assert resp.status_code == 400
    assert gist.contacts() == {}


def test_get_contact(gist: FakeGist, client: httpx.Client) -> None:
    client.post("/contacts", json=_contact("7", a=True))
    by_id = client.get("/contacts", params={"user_id": "7"})
    assert by_id.status_code == 200
    assert by_id.json()["contact"]["custom_properties"] == {"a": True}
    by_email = client.get("/contacts", params={"email": "7@example.com"})
    assert by_email.json()["contact"]["user_id"] == "7"
    missing = client.get("/contacts", params={"user_id": "8"})
    assert missing.status_code == 404
    assert missing.json() == {"errors": [{"message": "Not found"}]}
    assert [r.method for r in gist.requests("/contacts")] == ["POST", "GET", "GET", "GET"]


def test_unknown_endpoint_404(client: httpx.Client) -> None:
    assert client.get("/nope").status_code == 404
    assert client.delete("/contacts").status_code == 404


def test_events(gist: FakeGist, client: httpx.Client) -> None:
    event = {
        "event_name": "audience_joined",
        "email": "a@example.com",
        "user_id": "1",
        "properties": {"audience": "vip"},
        "occurred_at": 1_700_000_000,
    }
    resp = client.post("/events", json=event)
    assert resp.status_code == 200
    assert resp.json()["event"]["event_name"] == "audience_joined"
    stored = gist.events()
    assert len(stored) == 1
    assert stored[0]["properties"] == {"audience": "vip"}


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [(429, "2"), (503, "Wed, 21 Oct 2015 07:28:00 GMT"), (500, None)],
    ids=["429-seconds", "503-http-date", "500-no-header"],
)
def test_fail_next(
    gist: FakeGist, client: httpx.Client, status: int, retry_after: str | None
) -> None:
    gist.fail_next(1, status, retry_after=retry_after, message="slow down")
    resp = client.post("/contacts", json=_contact("1", a=True))
    assert resp.status_code == status
    assert resp.json() == {"errors": [{"message": "slow down"}]}
    assert resp.headers.get("Retry-After") == retry_after
    assert gist.contacts() == {}

    ok = client.post("/contacts", json=_contact("1", a=True))
    assert ok.status_code == 200
    assert gist.properties("a") == {"1": True}
    assert [r.status for r in gist.requests()] == [status, 200]


def test_drop_next(gist: FakeGist, client: httpx.Client) -> None:
    # Open a keep-alive connection first so the drop happens on a reused connection too.
    assert client.get("/contacts", params={"user_id": "x"}).status_code == 404
    gist.drop_next(1)
    with pytest.raises(httpx.TransportError):
        client.post("/contacts", json=_contact("1", a=True))
    assert gist.contacts() == {}
    ok = client.post("/contacts", json=_contact("1", a=True))
    assert ok.status_code == 200
    assert [r.status for r in gist.requests()] == [404, 0, 200]


def test_fail_user(gist: FakeGist, client: httpx.Client) -> None:
    gist.fail_user("bad")
    bad = client.post("/contacts", json=_contact("bad", a=True))
    assert bad.status_code == 422
    assert bad.json() == {"errors": [{"message": "Email is invalid"}]}
    batch = client.post("/contacts/batch", json={"contacts": [_contact("ok"), _contact("bad")]})
    assert batch.status_code == 422
    good = client.post("/contacts", json=_contact("good", a=True))
    assert good.status_code == 200
    assert set(gist.contacts()) == {"good"}


@pytest.mark.parametrize("email", ["", "no-at-sign", 7], ids=["empty", "no-at", "number"])
def test_an_email_that_is_no_address_is_refused(
    gist: FakeGist, client: httpx.Client, email: object
) -> None:
    contact = {"user_id": "u1", "email": email, "custom_properties": {"a": True}}
    event = {"event_name": "Audience Entered", "user_id": "u1", "email": email}
    for path, body in [("/contacts", contact), ("/contacts/batch", {"contacts": [contact]}),
                       ("/events", event)]:  # fmt: skip
        refused = client.post(path, json=body)
        assert (refused.status_code, refused.json()) == (
            400, {"errors": [{"message": f"email is invalid: {email!r}"}]},
        )  # fmt: skip
    assert (gist.contacts(), gist.events()) == ({}, [])
    without = client.post("/contacts", json={"user_id": "u1", "custom_properties": {"a": True}})
    assert without.status_code == 200
    assert gist.properties("a") == {"u1": True}


def test_lose_then_refuse(gist: FakeGist, client: httpx.Client) -> None:
    gist.lose_then_refuse("u1", 409)
    assert client.post("/contacts", json=_contact("u0", a=True)).status_code == 200
    with pytest.raises(httpx.RemoteProtocolError):  # applied, the answer lost
        client.post("/contacts", json=_contact("u1", a=True))
    assert gist.properties("a") == {"u0": True, "u1": True}
    retry = client.post("/contacts", json=_contact("u1", a=False))
    assert retry.status_code == 409
    assert (
        client.post("/contacts/batch", json={"contacts": [_contact("u1", a=False)]}).status_code
        == 409
    )
    assert gist.properties("a") == {"u0": True, "u1": True}


def test_refuse_events(gist: FakeGist, client: httpx.Client) -> None:
    gist.refuse_events("u1", 1)
    event = {"event_name": "Audience Entered", "user_id": "u1", "email": "u1@example.com"}
    assert client.post("/contacts", json=_contact("u1", a=True)).status_code == 200
    refused = client.post("/events", json=event)
    assert refused.status_code == 422
    assert refused.json() == {"errors": [{"message": "Event refused"}]}
    assert client.post("/events", json=event).status_code == 200
    assert [e["user_id"] for e in gist.events()] == ["u1"]


@pytest.mark.parametrize("status", [503, 401], ids=["gist-down", "key-revoked"])
def test_fail_after(gist: FakeGist, client: httpx.Client, status: int) -> None:
    gist.fail_after(2, status)
    statuses = [
        client.post("/contacts", json=_contact(str(i), a=True)).status_code for i in range(5)
    ]
    assert statuses == [200, 200, status, status, status]
    assert set(gist.contacts()) == {"0", "1"}
    gist.reset_faults()
    assert client.post("/contacts", json=_contact("9", a=True)).status_code == 200


def test_rate_limit(gist: FakeGist, client: httpx.Client) -> None:
    gist.rate_limit = 5
    responses = [client.post("/contacts", json=_contact(str(i), a=True)) for i in range(20)]
    limited = [r for r in responses if r.status_code == 429]
    assert limited
    assert all(r.status_code in (200, 429) for r in responses)
    for r in limited:
        assert int(r.headers["Retry-After"]) >= 1
    applied = sum(r.status_code == 200 for r in responses)
    assert len(gist.contacts()) == applied
    assert applied >= 5


def test_latency(gist: FakeGist, client: httpx.Client) -> None:
    gist.latency = 0.2
    start = time.monotonic()
    resp = client.post("/contacts", json=_contact("1", a=True))
    assert resp.status_code == 200
    assert time.monotonic() - start >= 0.2


def test_trickle_next_announces_a_length_and_sends_a_byte_at_a_time() -> None:
    gist = FakeGist(API_KEY).start()
    try:
        gist.trickle_next(1, length=1000, every=0.05)
        with _client(gist) as c, c.stream("POST", "/contacts", json=_contact("1", a=True)) as r:
            assert r.headers["Content-Length"] == "1000"
            chunks = r.iter_raw()
            arrived = [next(chunks) for _ in range(3)]
        assert [len(chunk) for chunk in arrived] == [1, 1, 1]  # one byte at a time
        assert set(gist.contacts()) == {"1"}  # applied: only its answer is slow
        with _client(gist) as c:
            assert c.post("/contacts", json=_contact("2", a=True)).status_code == 200
        gist.trickle_next(1, every=60)
        with _client(gist) as c, c.stream("POST", "/contacts", json=_contact("3", a=True)):
            start = time.monotonic()
            gist.stop()  # a trickle in progress does not hold up the stop
            assert time.monotonic() - start < 2.0
    finally:
        gist.stop()


def test_concurrent_requests(gist: FakeGist) -> None:
    barrier = threading.Barrier(30)

    def send(i: int) -> int:
        with _client(gist) as c:
            barrier.wait(timeout=5)
            return c.post("/contacts", json=_contact(str(i), a=True)).status_code

    with ThreadPoolExecutor(max_workers=30) as pool:
        statuses = list(pool.map(send, range(30)))
    assert statuses == [200] * 30
    assert len(gist.contacts()) == 30
    assert len(gist.requests("/contacts")) == 30


def test_stop_with_open_keepalive_connections() -> None:
    gist = FakeGist(API_KEY).start()
    clients = [_client(gist) for _ in range(5)]
    try:
        for c in clients:
            assert c.get("/contacts").status_code == 200
        start = time.monotonic()
        gist.stop()  # must not hang on the idle keep-alive connections
        assert time.monotonic() - start < 2.0
    finally:
        for c in clients:
            c.close()


def test_clear_log_keeps_contacts(gist: FakeGist, client: httpx.Client) -> None:
    client.post("/contacts", json=_contact("1", a=True))
    gist.clear_log()
    assert gist.requests() == []
    assert set(gist.contacts()) == {"1"}


# ------------------------------------------------------- `audience-sync fake-gist`, the command


@pytest.mark.slow
def test_fake_gist_command_prints_what_to_paste_and_a_run_pasting_it_syncs(
    tmp_path: Path,
) -> None:
    with fake_gist_process("--port", "0") as fake:
        assert fake.base_url.startswith("http://127.0.0.1:")
        assert fake.api_key == DEFAULT_KEY
        (tmp_path / "members.csv").write_text("user_id,email\n1,a@example.com\n")
        # What the printout says: its base_url in [gist], its key in the shell.
        (tmp_path / "audience_sync.toml").write_text(
            '[state]\nurl = "sqlite:///state.db"\n\n[gist]\napi_key = "${GIST_API_KEY}"\n'
            f'base_url = "{fake.base_url}"\n\n[[audiences]]\nname = "Members"\n'
            'file = "members.csv"\n'
        )
        done = run_process(
            "run", "--config", str(tmp_path / "audience_sync.toml"),
            env={"GIST_API_KEY": fake.api_key},
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert fake.contacts()["1"]["custom_properties"] == {"members": True}
    # fake_gist_process checked that SIGTERM ended it with exit 0.


@pytest.mark.slow
def test_fake_gist_command_takes_its_key_and_refuses_others() -> None:
    with fake_gist_process("--port", "0", "--api-key", "mine") as fake:
        assert fake.api_key == "mine"
        assert "export GIST_API_KEY=mine" in fake.printed
        wrong = httpx.get(f"{fake.base_url}/contacts", headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401
        assert fake.contacts() == {}


@pytest.mark.slow
def test_fake_gist_command_on_a_port_in_use_says_so(gist: FakeGist) -> None:
    port = gist.url.rsplit(":", 1)[1]

    with pytest.raises(FakeGistExitedError) as failed, fake_gist_process("--port", port):
        pass

    assert failed.value.code == 2
    assert failed.value.stderr == (
        f"error: cannot serve the fake Gist on 127.0.0.1:{port}: Address already in use; "
        "give another --port (0 picks a free one)\n"
    )
