"""``verify``: sampling, drift detection and repair against the loopback fake Gist."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, insert, select, update

from audience_sync import lease
from audience_sync import verify as verify_module
from audience_sync.errors import ApiError, AuthError, ConfigError, FencedError, LockHeldError
from audience_sync.fakegist import FakeGist
from audience_sync.models import leases, memberships, uncertain_members
from audience_sync.sync import run_once
from audience_sync.verify import MISSING, Drift, VerifyReport, compare, verify_audience
from tests.conftest import API_KEY, Workspace, write_members
from tests.helpers import free_port

KEY = "vip_customers"


def setup(workspace: Workspace, engine: Engine, members: range) -> Path:
    source = workspace.add_file_audience("VIP Customers")
    write_members(source, members)
    [result] = run_once(workspace.settings(), engine)
    assert result.status == "succeeded"
    return source


def verify(workspace: Workspace, engine: Engine, **options: Any) -> VerifyReport:
    return verify_audience(workspace.settings(), engine, KEY, **options)


def tamper(gist: FakeGist, user_id: str, properties: dict[str, Any]) -> None:
    """Edit a contact in Gist behind audience-sync's back."""
    tamper_many(gist, {user_id: properties})


def tamper_many(gist: FakeGist, edits: dict[str, dict[str, Any]]) -> None:
    with httpx.Client(base_url=gist.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for user_id, properties in edits.items():
            body = {"user_id": user_id, "email": f"{user_id}@example.com"}
            http.post(
                "/contacts", json={**body, "custom_properties": properties}
            ).raise_for_status()


def fetches(gist: FakeGist) -> list[Any]:
    return [r for r in gist.requests("/contacts") if r.method == "GET"]


def uncertain(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.scalars(select(uncertain_members.c.user_id)))


def test_after_a_sync_every_sampled_member_matches(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    setup(workspace, engine, range(10))
    report = verify(workspace, engine)
    assert (report.sampled, report.matching, report.drifted, report.repaired) == (10, 10, [], 0)
    assert len(fetches(gist)) == 10


def test_values_edited_in_gist_are_drift(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    setup(workspace, engine, range(10))
    tamper_many(gist, {"u1": {KEY: False}, "u2": {KEY: None}, "u3": {KEY: "yes"}})
    report = verify(workspace, engine)
    assert (report.sampled, report.matching) == (10, 7)
    assert sorted(report.drifted, key=lambda d: d.user_id) == [
        Drift("u1", True, False, "value differs"),
        Drift("u2", True, None, "value differs"),
        Drift("u3", True, "yes", "value differs"),
    ]


@pytest.mark.parametrize(
    ("expected", "contact", "drift"),
    [
        (True, {"custom_properties": {KEY: True}}, None),
        (True, {"custom_properties": {KEY: "true"}}, Drift("u", True, "true", "value differs")),
        (True, {"custom_properties": {}}, Drift("u", True, None, "property missing")),
        (True, None, Drift("u", True, MISSING, "contact missing")),
        (False, {"custom_properties": {KEY: False}}, None),
        (False, {"custom_properties": {KEY: None}}, None),
        (False, {"custom_properties": {}}, None),
        (False, None, None),
        (False, {"custom_properties": {KEY: True}}, Drift("u", False, True, "value differs")),
    ],
    ids=[
        "member-true",
        "member-string",
        "member-no-property",
        "member-no-contact",
        "exit-false",
        "exit-null",
        "exit-no-property",
        "exit-no-contact",
        "exit-still-true",
    ],
)
def test_compare(expected: bool, contact: dict[str, Any] | None, drift: Drift | None) -> None:
    assert compare(KEY, "u", expected, contact) == drift


def test_missing_contact_and_property_are_drift_and_report_is_json(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    setup(workspace, engine, range(3))
    tamper(gist, "x1", {"other": 1})  # a contact Gist holds without our property
    now = datetime(2024, 1, 1)
    with engine.begin() as connection:
        connection.execute(
            insert(memberships),
            [
                {"audience_key": KEY, "user_id": u, "email": f"{u}@example.com", "since": now,
                 "last_run_id": 1}
                for u in ("x1", "ghost")
            ],
        )  # fmt: skip
    report = verify(workspace, engine, repair=True)
    assert sorted(report.drifted, key=lambda d: d.user_id) == [
        Drift("ghost", True, MISSING, "contact missing"),
        Drift("x1", True, None, "property missing"),
    ]
    assert uncertain(engine) == {"ghost", "x1"}
    data = json.loads(json.dumps(report.to_dict()))
    assert {k: v for k, v in data.items() if k != "drifted"} == {
        "audience_key": KEY, "sampled": 5, "matching": 3, "repaired": 2, "errors": [],
    }  # fmt: skip
    assert {d["user_id"]: (d["actual"], d["reason"]) for d in data["drifted"]} == {
        "ghost": (MISSING, "contact missing"),
        "x1": (None, "property missing"),
    }


def test_repair_resends_exactly_the_drifted_users(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    setup(workspace, engine, range(10))
    tamper_many(gist, {"u3": {KEY: False}, "u5": {KEY: None}})
    with engine.connect() as connection:
        before = connection.execute(select(memberships)).all()

    report = verify(workspace, engine, repair=True)
    assert {d.user_id for d in report.drifted} == {"u3", "u5"}
    assert report.repaired == 2
    assert uncertain(engine) == {"u3", "u5"}
    with engine.connect() as connection:
        assert connection.execute(select(memberships)).all() == before

    gist.clear_log()
    [result] = run_once(workspace.settings(), engine)
    assert result.status == "succeeded"
    sent = {r.body["user_id"]: r.body["custom_properties"] for r in gist.requests()}
    assert sent == {"u3": {KEY: True}, "u5": {KEY: True}}
    assert uncertain(engine) == set()
    assert verify(workspace, engine).drifted == []


def test_a_repair_holds_the_keys_lease_and_waits_for_no_run(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """A repair takes the key's lease as a run does: while another process holds it, the
    repair reads and records nothing (a run in between could settle, or take back when
    Gist refuses it, the uncertainty it records); a plain verify only reads, and goes on."""
    setup(workspace, engine, range(4))
    tamper(gist, "u1", {KEY: False})
    lease.acquire(engine, KEY, "another-host:1:run", 60)
    gist.clear_log()

    with pytest.raises(LockHeldError, match="another-host:1:run"):
        verify(workspace, engine, repair=True)
    assert (fetches(gist), uncertain(engine)) == ([], set())
    assert [d.user_id for d in verify(workspace, engine).drifted] == ["u1"]

    lease.release(engine, [KEY], "another-host:1:run")
    assert verify(workspace, engine, repair=True).repaired == 1
    assert uncertain(engine) == {"u1"}
    lease.acquire(engine, KEY, "another-host:1:run", 60)  # the repair gave its lease back


def test_a_repair_whose_lease_was_taken_over_saves_nothing(
    workspace: Workspace, engine: Engine, gist: FakeGist, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup(workspace, engine, range(4))
    tamper(gist, "u1", {KEY: False})
    fetch_all = verify_module._fetch_all

    async def then_taken_over(*args: Any) -> Any:
        found = await fetch_all(*args)
        with engine.begin() as connection:  # expired and taken over while Gist was read
            connection.execute(update(leases).values(owner="another-host:1:run"))
        return found

    monkeypatch.setattr(verify_module, "_fetch_all", then_taken_over)
    with pytest.raises(FencedError, match="nothing repaired"):
        verify(workspace, engine, repair=True)
    assert uncertain(engine) == set()


def test_an_exit_gist_lost_is_caught_and_repaired(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = setup(workspace, engine, range(10))
    write_members(source, range(8))  # u8, u9 exit
    run_once(workspace.settings(), engine)
    tamper(gist, "u8", {KEY: True})

    report = verify(workspace, engine, sample=40, repair=True)
    assert report.sampled == 10  # 8 members + both exits
    assert report.drifted == [Drift("u8", False, True, "value differs")]
    gist.clear_log()
    run_once(workspace.settings(), engine)
    assert [(r.body["user_id"], r.body["custom_properties"]) for r in gist.requests()] == [
        ("u8", {KEY: False})
    ]
    assert gist.properties(KEY)["u8"] is False
    assert verify(workspace, engine, sample=40).drifted == []


def test_sample_size_is_respected(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    source = setup(workspace, engine, range(30))
    write_members(source, range(27))  # three exits
    run_once(workspace.settings(), engine)
    gist.clear_log()
    report = verify(workspace, engine, sample=5)
    assert report.sampled == 6  # 5 members + 5 // 4 exit checks
    assert len(fetches(gist)) == 6


def test_a_seeded_sample_is_reproducible(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    setup(workspace, engine, range(12))
    tamper_many(gist, {f"u{n}": {KEY: False} for n in range(12)})
    first = verify(workspace, engine, sample=5, seed=7)
    again = verify(workspace, engine, sample=5, seed=7)
    assert len(first.drifted) == 5
    assert first.drifted == again.drifted


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True, ids=["sqlite"])
def test_fetches_honour_the_rate_limit(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    setup(workspace, engine, range(21))
    workspace.gist_options["requests_per_second"] = 20
    workspace.write_config()
    gist.clear_log()
    assert verify(workspace, engine, sample=21).matching == 21
    times = [r.at for r in fetches(gist)]
    assert len(times) == 21
    assert max(times) - min(times) >= 0.95  # 20 intervals of 1/20 s; a lower bound only


def test_a_429_is_retried(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    setup(workspace, engine, range(3))
    gist.clear_log()
    gist.fail_next(2, 429, retry_after="0")
    report = verify(workspace, engine)
    assert (report.sampled, report.matching) == (3, 3)
    assert sorted(r.status for r in fetches(gist)) == [200, 200, 200, 429, 429]


def test_a_refused_key_aborts(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    setup(workspace, engine, range(3))
    gist.fail_after(0, 401)
    with pytest.raises(AuthError, match="401"):
        verify(workspace, engine, repair=True)
    assert uncertain(engine) == set()


def test_an_unknown_audience_is_a_config_error(workspace: Workspace, engine: Engine) -> None:
    setup(workspace, engine, range(1))
    with pytest.raises(ConfigError, match="no audience with key 'nope'"):
        verify_audience(workspace.settings(), engine, "nope")


def test_api_errors_are_reported_apart_from_drift_and_not_repaired(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    setup(workspace, engine, range(5))
    gist.fail_user("u2", 422, "Nope")
    report = verify(workspace, engine, repair=True)
    assert report.drifted == []
    assert [(e.user_id, e.error) for e in report.errors] == [("u2", "HTTP 422: Nope")]
    assert (report.sampled, report.matching, report.repaired) == (5, 4, 0)
    assert uncertain(engine) == set()


def test_an_unreachable_gist_is_an_error_not_drift(workspace: Workspace, engine: Engine) -> None:
    setup(workspace, engine, range(3))
    port = free_port()  # nothing listens there
    workspace.gist_url = f"http://127.0.0.1:{port}"
    workspace.gist_options["max_retries"] = 1
    workspace.write_config()
    with pytest.raises(ApiError, match=f"cannot reach Gist at http://127.0.0.1:{port}"):
        verify(workspace, engine, repair=True)
    assert uncertain(engine) == set()


def trait_setup(workspace: Workspace, engine: Engine, values: dict[str, Any]) -> None:
    path = workspace.root / "ltv.jsonl"
    path.write_text(
        "".join(
            json.dumps({"user_id": u, "email": f"{u}@example.com", "value": v}) + "\n"
            for u, v in values.items()
        )
    )
    workspace.traits.append({"name": "Lifetime Value", "file": path.name})
    workspace.write_config()
    results = run_once(workspace.settings(), engine)
    assert [r.status for r in results] == ["succeeded"]


def test_traits_are_verified_by_value(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    values = {f"t{n}": v for n, v in enumerate([1, 2.5, "gold", True, None, 0, 7, 8, 9, 10])}
    trait_setup(workspace, engine, values)
    report = verify_audience(workspace.settings(), engine, "lifetime_value")
    assert (report.sampled, report.matching, report.drifted) == (10, 10, [])

    tamper_many(gist, {u: {"lifetime_value": "wrong"} for u in values})
    report = verify_audience(workspace.settings(), engine, "lifetime_value", repair=True)
    assert (report.sampled, report.matching) == (10, 0)
    assert {d.user_id: (d.expected, d.actual) for d in report.drifted} == {
        u: (v, "wrong") for u, v in values.items()
    }
    assert report.repaired == 10


def test_a_trait_value_of_another_type_is_drift(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    trait_setup(workspace, engine, {"t1": 1, "t2": "1", "t3": 1.5})
    tamper_many(gist, {"t1": {"lifetime_value": "1"}, "t2": {"lifetime_value": 1}})
    report = verify_audience(workspace.settings(), engine, "lifetime_value")
    assert sorted((d.user_id, d.reason) for d in report.drifted) == [
        ("t1", "value differs"),
        ("t2", "value differs"),
    ]
    assert report.matching == 1


class CountingTransport(httpx.AsyncBaseTransport):
    """Forwards to the real fake Gist and notes how many asyncio tasks exist per request."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.tasks: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.tasks.append(len(asyncio.all_tasks()))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_samples_stream_through_the_workers_not_one_task_each(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    setup(workspace, engine, range(300))
    workspace.gist_options["max_concurrency"] = 4
    workspace.write_config()
    transport = CountingTransport()
    report = verify(workspace, engine, sample=300, transport=transport)
    assert report.matching == 300
    assert len(transport.tasks) == 300
    # The 4 workers, the main task and what httpx runs itself: never one task per sample.
    assert max(transport.tasks) <= 2 * 4 + 2


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html><body>Bad gateway</body></html>", "text/html"),
        (b"[1,2,3]", "application/json"),
        (b'{"contacts": []}', "application/json"),
        (b'{"contact": "u1"}', "application/json"),
        (b"\xff\xfe", "application/json"),
    ],
    ids=["html", "a-list", "another-shape", "contact-not-an-object", "not-utf8"],
)
def test_an_unreadable_answer_could_not_be_checked_and_is_no_drift(
    workspace: Workspace,
    engine: Engine,
    gist: FakeGist,
    body: bytes,
    content_type: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 200 that does not carry a contact says nothing of it: it was a crash ("failed
    unexpectedly: JSONDecodeError", exit 1 = drift), and `[1,2,3]` counted as drift."""
    setup(workspace, engine, range(3))
    gist.answer_next(3, 200, body, content_type)

    report = verify(workspace, engine, sample=3, repair=True)

    assert (report.matching, report.drifted, report.repaired) == (0, [], 0)
    assert len(report.errors) == 3
    assert "an answer that is not a contact" in report.errors[0].error
    from audience_sync.cli import run_cli

    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    gist.answer_next(3, 200, body, content_type)
    assert run_cli(["verify", KEY, "--config", str(workspace.config_path)]) == 2
    out, err = capsys.readouterr()
    assert "drifted" not in err
    assert "Traceback" not in out + err
