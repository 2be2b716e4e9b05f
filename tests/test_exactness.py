"""Regression tests for the exactness holes an adversarial review found (issue 9): each one
reproduces the hole as the review did, against the loopback fake Gist, on both stores."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import time_machine
from sqlalchemy import Engine, create_engine, func, inspect, select, text, update
from sqlalchemy.engine import Connection

from audience_sync import lease
from audience_sync.cli import run_cli
from audience_sync.errors import LockHeldError
from audience_sync.fakegist import FakeGist
from audience_sync.history import load_run, prune
from audience_sync.models import (
    audiences,
    leases,
    member_changes,
    memberships,
    rejected_rows,
    sync_runs,
    trait_values,
    uncertain_members,
)
from audience_sync.runs import utcnow
from audience_sync.sync import RunResult, run_once
from audience_sync.verify import save_repairs
from tests.conftest import API_KEY, Workspace, plant_lease, require_postgres, write_members
from tests.helpers import (
    LEASE_SECONDS,
    database_time,
    lease_of,
    renew_leases,
    take_lease,
)

VIP = "vip"
TRAIT = "score"


def sync(workspace: Workspace, engine: Engine, **options: Any) -> list[RunResult]:
    return run_once(workspace.settings(), engine, **options)


def add_audience(workspace: Workspace, key: str = VIP, **options: Any) -> Path:
    path = workspace.root / f"{key}.jsonl"
    path.write_text("")
    workspace.audiences.append({"name": key.title(), "key": key, "file": path.name, **options})
    workspace.write_config()
    return path


def add_trait(workspace: Workspace, key: str = TRAIT, **options: Any) -> Path:
    path = workspace.root / f"{key}.jsonl"
    path.write_text("")
    workspace.traits.append({"name": key.title(), "key": key, "file": path.name, **options})
    workspace.write_config()
    return path


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def values(path: Path, by_user: dict[str, Any]) -> None:
    write_rows(
        path, [{"user_id": u, "email": f"{u}@example.com", "value": v} for u, v in by_user.items()]
    )


def lose_answers(workspace: Workspace, gist: FakeGist) -> None:
    """Gist applies every request but its answer never arrives (the client times out)."""
    workspace.gist_options.update(timeout_seconds=0.2, max_retries=0)
    workspace.write_config()
    gist.latency = 0.5


def answers_again(workspace: Workspace, gist: FakeGist) -> None:
    time.sleep(0.6)  # the fake finishes applying what it was still sleeping on
    gist.reset_faults()
    workspace.gist_options.update(timeout_seconds=2, max_retries=3)
    workspace.write_config()


def sync_losing_answers(workspace: Workspace, engine: Engine, gist: FakeGist) -> list[RunResult]:
    """One sync whose every request Gist applies but whose answers are lost; then Gist
    answers again."""
    lose_answers(workspace, gist)
    results = sync(workspace, engine)
    answers_again(workspace, gist)
    return results


def held(gist: FakeGist, key: str) -> dict[str, Any]:
    return gist.properties(key)


def table(engine: Engine, query: Any) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(query).all())


# 1 ----------------------------------------------------------------------------------------


def test_null_trait_value_then_lost_answer_then_leaving_sends_null(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_trait(workspace)
    values(source, {"u1": None, "u2": 1})
    sync(workspace, engine)
    assert held(gist, TRAIT) == {"u1": None, "u2": 1}

    values(source, {"u1": 7, "u2": 1})
    [lost] = sync_losing_answers(workspace, engine, gist)
    assert lost.status == "failed"
    assert held(gist, TRAIT)["u1"] == 7  # applied, though never acknowledged

    values(source, {"u2": 1})  # u1 leaves the trait's result
    [run] = sync(workspace, engine)

    assert run.status == "succeeded"
    assert held(gist, TRAIT) == {"u1": None, "u2": 1}
    gist.clear_log()
    assert (sync(workspace, engine)[0].entered, gist.requests()) == (0, [])


def test_a_trait_value_back_to_the_acknowledged_one_after_a_lost_answer_is_sent(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    # The value is the acknowledged one again, so only u1 being uncertain (Gist may hold
    # the 7 whose answer was lost) says to send it. Found by benchmarks/mutation.py.
    source = add_trait(workspace)
    values(source, {"u1": 1, "u2": 1})
    sync(workspace, engine)
    values(source, {"u1": 7, "u2": 1})
    sync_losing_answers(workspace, engine, gist)
    assert held(gist, TRAIT)["u1"] == 7  # applied, though never acknowledged

    values(source, {"u1": 1, "u2": 1})
    [run] = sync(workspace, engine)

    assert run.status == "succeeded"
    assert held(gist, TRAIT) == {"u1": 1, "u2": 1}
    gist.clear_log()
    assert (sync(workspace, engine)[0].entered, gist.requests()) == (0, [])


def test_an_object_value_with_its_keys_in_another_order_is_the_same_value(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    # Values are compared as canonical JSON: a source that writes the same object's keys
    # in another order has changed nothing, so nothing is sent and no event is owed.
    source = add_trait(workspace, send_track=True)
    values(source, {"u1": {"tier": "gold", "points": 3}})
    sync(workspace, engine)
    values(source, {"u1": {"points": 3, "tier": "gold"}})
    gist.clear_log()

    [run] = sync(workspace, engine)

    assert (run.status, run.entered, run.resent) == ("succeeded", 0, 0)
    assert gist.requests() == []
    assert held(gist, TRAIT) == {"u1": {"points": 3, "tier": "gold"}}


# 2 ----------------------------------------------------------------------------------------


def test_refused_request_leaves_the_member_uncertain(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace)
    write_members(source, [2])
    sync(workspace, engine)
    write_members(source, [1, 2])
    sync_losing_answers(workspace, engine, gist)  # u1's `true` is applied, its answer lost
    assert held(gist, VIP)["u1"] is True

    write_members(source, [2])  # u1 leaves, and Gist refuses the exit
    gist.fail_user("u1", 422)
    [refused] = sync(workspace, engine)
    assert refused.status == "partial"
    gist.reset_faults()

    [run] = sync(workspace, engine)  # the member is still uncertain: planned again

    assert (run.exited, run.status) == (1, "succeeded")
    assert held(gist, VIP) == {"u1": False, "u2": True}


def test_a_member_back_after_an_exit_whose_answer_was_lost_is_sent_again(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    # The member is still acknowledged with its old email, so the diff alone sees nothing
    # to do; only its being uncertain says Gist may hold the exit. Found by the stateful
    # model (200 examples) once the uncertain members were planned apart from the diff.
    source = add_audience(workspace)
    write_members(source, [1, 2])
    sync(workspace, engine)
    write_members(source, [2])
    sync_losing_answers(workspace, engine, gist)  # u1's exit is applied, its answer lost
    assert held(gist, VIP)["u1"] is False

    write_members(source, [1, 2])
    [run] = sync(workspace, engine)

    assert run.status == "succeeded"
    assert held(gist, VIP) == {"u1": True, "u2": True}
    assert table(engine, select(uncertain_members.c.user_id)) == []


def test_refusal_of_a_certain_member_leaves_it_certain(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace)
    write_members(source, [1, 2])
    sync(workspace, engine)
    write_members(source, [2])
    gist.fail_user("u1", 422)
    sync(workspace, engine)
    # Gist did not apply the exit, so it still holds the acknowledged `true`: nothing is
    # uncertain, and the exit is simply planned again from the acknowledged state.
    assert table(engine, select(uncertain_members.c.user_id)) == []
    gist.reset_faults()
    assert sync(workspace, engine)[0].exited == 1
    assert held(gist, VIP) == {"u1": False, "u2": True}


# 3 ----------------------------------------------------------------------------------------


def test_every_request_carries_the_current_email(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    vip = add_audience(workspace)
    other = add_audience(workspace, "other")
    write_members(vip, [("u1", "old@example.com"), 2, 3])
    sync(workspace, engine)
    assert gist.contacts()["u1"]["email"] == "old@example.com"

    # u1 leaves VIP as another source brings it with a new email. The diff plans the exit
    # from VIP's acknowledged row (old@); the one request for u1 must carry new@.
    write_members(vip, [2, 3])
    write_members(other, [("u1", "new@example.com")])
    gist.clear_log()
    vip_run, _ = sync(workspace, engine)

    [request] = gist.requests("/contacts")
    assert request.body == {
        "user_id": "u1",
        "email": "new@example.com",
        "custom_properties": {VIP: False, "other": True},
    }
    assert gist.contacts()["u1"]["email"] == "new@example.com"
    [exit_email] = table(
        engine,
        select(member_changes.c.email).where(member_changes.c.run_id == vip_run.run_id),
    )
    assert tuple(exit_email) == ("new@example.com",)  # the ledger says what was sent

    write_members(other, [("u1", "newer@example.com")])
    write_members(vip, [("u1", "newer@example.com"), 2, 3])  # back in VIP, newer email
    gist.clear_log()
    sync(workspace, engine)

    assert {r.body["email"] for r in gist.requests("/contacts")} == {"newer@example.com"}
    assert gist.contacts()["u1"]["email"] == "newer@example.com"


def test_exit_of_a_user_no_source_has_carries_the_last_acknowledged_email(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    vip = add_audience(workspace)
    other = add_audience(workspace, "other")
    write_members(vip, [("u1", "old@example.com"), 2, 3])
    sync(workspace, engine)
    write_members(other, [("u1", "new@example.com")])
    sync(workspace, engine, keys=["other"])  # only `other` runs: Gist now has new@
    write_members(vip, [2, 3])
    write_members(other, [])
    gist.clear_log()

    sync(workspace, engine, allow_mass_exit=True)

    assert {r.body["email"] for r in gist.requests("/contacts")} == {"new@example.com"}
    assert gist.contacts()["u1"]["email"] == "new@example.com"


def test_changed_email_of_an_unchanged_member_is_sent_once(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    vip = add_audience(workspace, send_track=True)
    write_members(vip, [1, 2])
    sync(workspace, engine)
    write_members(vip, [("u1", "moved@example.com"), 2])
    gist.clear_log()

    [run] = sync(workspace, engine)

    assert (run.entered, run.exited, run.resent, run.delivered) == (0, 0, 1, 1)
    [request] = gist.requests("/contacts")
    assert request.body["email"] == "moved@example.com"
    assert request.body["custom_properties"] == {VIP: True}
    assert gist.requests("/events") == []  # a re-send is not an entry
    assert gist.contacts()["u1"]["email"] == "moved@example.com"
    [change] = table(
        engine,
        select(member_changes.c.user_id, member_changes.c.email).where(
            member_changes.c.run_id == run.run_id
        ),
    )
    assert tuple(change) == ("u1", "moved@example.com")
    gist.clear_log()
    assert (sync(workspace, engine)[0].resent, gist.requests()) == (0, [])


def test_two_audiences_disagreeing_on_an_email_use_the_first_and_report_it(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    vip = add_audience(workspace)
    other = add_audience(workspace, "other")
    write_members(vip, [("u1", "first@example.com")])
    write_members(other, [("u1", "second@example.com")])

    first, second = sync(workspace, engine)

    assert (first.email_conflicts, second.email_conflicts) == (0, 1)
    assert gist.contacts()["u1"]["email"] == "first@example.com"
    shown = load_run(engine, second.run_id or 0)
    assert shown is not None
    assert shown["email_conflict_rows"] == [
        {"user_id": "u1", "email": "second@example.com", "used_email": "first@example.com"}
    ]
    gist.clear_log()
    sync(workspace, engine)
    assert gist.requests() == []  # stable: the conflict does not re-send every run


def test_keys_named_out_of_config_order_still_send_the_first_configured_email(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """A review's counterexample: `run other vip` staged in the order named, so the second
    configured source's email won, and the next plain run (config order) moved it back:
    each differently ordered invocation changed the contact's email in Gist."""
    vip = add_audience(workspace)
    other = add_audience(workspace, "other")
    write_members(vip, [("u1", "first@example.com")])
    write_members(other, [("u1", "second@example.com")])

    results = sync(workspace, engine, keys=["other", VIP])

    assert [r.audience_key for r in results] == [VIP, "other"]
    assert gist.contacts()["u1"]["email"] == "first@example.com"
    gist.clear_log()
    sync(workspace, engine)
    assert gist.requests() == []


# 4 ----------------------------------------------------------------------------------------


def test_trait_guard_counts_values_not_nulls(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_trait(workspace)
    values(source, {"u1": 1, "u2": 2})
    sync(workspace, engine)
    values(source, {})
    assert sync(workspace, engine)[0].status == "guarded"
    assert sync(workspace, engine, allow_mass_exit=True)[0].status == "succeeded"
    assert held(gist, TRAIT) == {"u1": None, "u2": None}

    [later] = sync(workspace, engine)  # nothing left to remove: not "would remove 0 of 2"

    assert (later.status, later.exited) == ("succeeded", 0)


def test_trait_guard_stops_losing_every_value_among_many_nulls(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    workspace.gist_options["batch_size"] = 100
    workspace.write_config()
    source = add_trait(workspace)
    everyone = {f"u{n}": (n if n < 50 else None) for n in range(200)}
    values(source, everyone)
    sync(workspace, engine)

    values(source, dict.fromkeys(everyone))  # all 50 values become null

    [run] = sync(workspace, engine)
    assert run.status == "guarded"
    assert "would remove 50 of 50 values" in (run.error or "")
    assert sum(v is not None for v in held(gist, TRAIT).values()) == 50


def test_guard_counts_uncertain_members(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace)
    write_members(source, range(5))
    sync_losing_answers(workspace, engine, gist)  # every answer lost: 0 acknowledged, 5 uncertain
    write_members(source, [])
    gist.clear_log()

    [run] = sync(workspace, engine)

    assert run.status == "guarded"
    assert "would remove 5 of 5 members (100%" in (run.error or "")
    assert gist.requests() == []


def test_guard_percentages_stay_true_after_a_refused_backfill(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace)
    write_members(source, range(7))
    sync(workspace, engine)
    write_members(source, [*range(7), 7])
    gist.fail_next(50, 401)
    sync(workspace, engine, mode="backfill")  # every request refused: 401
    gist.reset_faults()
    write_members(source, [])

    [run] = sync(workspace, engine)

    assert run.status == "guarded"
    assert "would remove 7 of 7 members (100%" in (run.error or "")


# 6 ----------------------------------------------------------------------------------------


OTHER = "elsewhere/boot.1:1:live"  # another machine's owner: never taken for dead
SKEWS = [pytest.param(120, id="client-2-min-fast"), pytest.param(-120, id="client-2-min-slow")]


@contextmanager
def client_clock_off_by(engine: Engine, seconds: int) -> Iterator[None]:
    """Shift this process's clocks (``time.time``, ``datetime.now``, …) by ``seconds``; the
    database's clock (SQLite's C library, PostgreSQL's server) stays where it is."""
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=seconds), tick=True):
        skew = (utcnow() - database_time(engine)).total_seconds()
        assert abs(skew - seconds) < 5, "the client's clock did not move apart from the database's"
        yield


@pytest.mark.parametrize("skew", SKEWS)
def test_lease_times_come_from_the_database_not_the_client(
    workspace: Workspace, engine: Engine, gist: FakeGist, skew: int
) -> None:
    live = add_audience(workspace, "live")
    expired = add_audience(workspace, "expired")
    write_members(live, [1])
    write_members(expired, [2])
    plant_lease(engine, "live", OTHER, 30)  # 30 s left, database time
    plant_lease(engine, "expired", OTHER, -30)  # ended 30 s ago, database time
    planted = lease_of(engine, "live")

    # A client two minutes fast sees the live lease as expired, one two minutes slow sees the
    # expired one as live: neither may act on it.
    with client_clock_off_by(engine, skew):
        on_live, on_expired = sync(workspace, engine)

    assert (on_live.status, on_expired.status) == ("skipped", "succeeded")
    assert [r.body["user_id"] for r in gist.requests("/contacts")] == ["u2"]
    assert lease_of(engine, "live") == planted  # untouched
    assert lease_of(engine, "expired") is None  # taken over, then released


@pytest.mark.parametrize("skew", SKEWS)
def test_a_lease_is_taken_and_renewed_until_the_database_now_plus_its_length(
    engine: Engine, skew: int
) -> None:
    me = "here/boot.1:1:me"
    plant_lease(engine, "live", OTHER, 30)
    plant_lease(engine, "expired", OTHER, -30)
    plant_lease(engine, "mine", me, 30)
    plant_lease(engine, "mine-expired", me, -30)  # lapsed: renewing cannot bring it back
    untouched = {key: lease_of(engine, key) for key in ("live", "mine-expired")}

    with client_clock_off_by(engine, skew):
        before = database_time(engine)
        with pytest.raises(LockHeldError, match=f"'live' is being synced by {OTHER}"):
            take_lease(engine, "live", me)
        assert take_lease(engine, "expired", me) == OTHER
        assert take_lease(engine, "new", me) is None
        assert renew_leases(engine, ["mine", "mine-expired", "live"], me) == {"mine"}
        after = database_time(engine)

    length, slack = timedelta(seconds=LEASE_SECONDS), timedelta(seconds=1)
    for key in ("expired", "new", "mine"):
        row = lease_of(engine, key)
        assert row is not None, key
        owner, acquired, expires = row
        assert owner == me, key
        assert before - slack <= expires - length <= after + slack, key
        if key != "mine":  # renewing moves the end only
            assert before - slack <= acquired <= after + slack, key
    assert {key: lease_of(engine, key) for key in untouched} == untouched


def test_a_holder_that_loses_its_lease_stops_and_records_nothing_more(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    workspace.gist_options.update(max_concurrency=2)
    workspace.write_config()
    source = add_audience(workspace)
    write_members(source, range(60))
    gist.latency = 0.05
    import threading

    at_theft: dict[str, Any] = {}

    def steal() -> None:
        while len(gist.requests("/contacts")) < 10:
            time.sleep(0.005)
        with engine.begin() as connection:
            connection.execute(update(leases).values(owner="thief/boot.1:1:x"))
            # What was recorded when the lease changed hands (in the same transaction: a
            # save of the holder's either committed before it or is fenced out after it).
            at_theft["members"] = set(connection.scalars(select(memberships.c.user_id)))
            at_theft["delivered"] = delivered_changes(connection)
            at_theft["answered"] = len(gist.requests("/contacts"))

    thief = threading.Thread(target=steal)
    thief.start()
    [run] = sync(workspace, engine)
    thief.join()
    stolen_at = len(gist.requests("/contacts"))

    assert run.status == "interrupted"
    assert "vip: lease taken over by thief/boot.1:1:x" in (run.error or "")
    # It stopped within one acknowledgement flush, not after all 60.
    assert stolen_at < 60
    acked = {u for (u,) in table(engine, select(memberships.c.user_id))}
    in_gist = {u for u, v in held(gist, VIP).items() if v is True}
    assert acked <= in_gist  # only what Gist acknowledged before the theft was recorded
    # Gist answered the holder after the theft (requests in flight, acknowledgements not yet
    # saved), and none of those answers was recorded: not one membership, not one change.
    assert stolen_at > at_theft["answered"]
    assert acked == at_theft["members"]
    with engine.connect() as connection:
        assert delivered_changes(connection) == at_theft["delivered"]
    with engine.begin() as connection:
        connection.execute(leases.delete())
    gist.latency = 0
    assert sync(workspace, engine)[0].status == "succeeded"
    assert {u for u, v in held(gist, VIP).items() if v is True} == {f"u{n}" for n in range(60)}


def delivered_changes(connection: Connection) -> int:
    return int(
        connection.scalar(select(func.count()).where(member_changes.c.status == "delivered")) or 0
    )


def test_owners_on_two_hosts_with_one_name_are_not_mistaken_for_dead() -> None:
    mine = lease.new_owner()
    place, _pid, tag = mine.rsplit(":", 2)
    host, rest = place.split("/", 1)
    boot, namespace = rest.split(".", 1)
    other_boot = f"{host}/{'0' * len(boot)}.{namespace}:999999:{tag}"  # same name, other host

    assert lease.is_dead_local_owner(f"{place}:999999:{tag}")  # our host: pid is gone
    assert not lease.is_dead_local_owner(other_boot)  # cannot know: left to expire


# 7 ----------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_password_in_a_url_query_never_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = require_postgres()
    secret = f"pw-{uuid.uuid4().hex}"
    bad = admin.replace("/test", "/no_such_database") + f"?password={secret}"
    good = f"{admin}?password={secret}"
    with FakeGist(api_key=API_KEY) as gist:
        workspace = Workspace(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", gist.url)
        workspace.add_sql_audience("Broken", bad, "SELECT 'u1' AS user_id, 'a@b.co' AS email")
        workspace.sources["ok"] = good
        workspace.audiences.append(
            {"name": "Fine", "source": "ok", "query": "SELECT 'u1' AS user_id, 'a@b.co' AS email"}
        )
        workspace.write_config()
        monkeypatch.setenv("GIST_API_KEY", API_KEY)
        config = str(workspace.config_path)
        outputs = []
        for args in (
            ["run", "-vv"],
            ["run", "--json"],
            ["audiences", "--json"],
            ["history", "--json"],
            ["show", "1", "--json"],
        ):
            run_cli([*args, "--config", config])
            outputs.append("".join(capsys.readouterr()))
        state = create_engine(workspace.state_url)
        with state.connect() as connection:
            stored = [
                str(row)
                for t in (audiences, sync_runs, rejected_rows, member_changes)
                for row in connection.execute(select(t)).all()
            ]
        state.dispose()
    assert "no_such_database" in outputs[0]  # the failure is reported...
    assert all(secret not in output for output in outputs)  # ...without the password
    assert all(secret not in row for row in stored)
    assert "password=***" in outputs[2]


def test_redact_url_hides_credential_query_parameters() -> None:
    from audience_sync.config import redact_url, scrub

    assert (
        redact_url("postgresql://u@h/db?password=s3cret&sslmode=require")
        == "postgresql://u@h/db?password=***&sslmode=require"
    )
    assert redact_url("mysql+pymysql://u:pw@h/db?passwd=s3cret") == (
        "mysql+pymysql://u:***@h/db?passwd=***"
    )
    assert scrub("FATAL: no s3cret here", "postgresql://u@h/db?password=s3cret") == (
        "FATAL: no *** here"
    )


# 8 ----------------------------------------------------------------------------------------


def test_a_lone_surrogate_is_rejected_and_the_others_still_sync(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    broken = add_audience(workspace, "broken")
    fine = add_audience(workspace, "fine")
    broken.write_text(
        '{"user_id": "\\ud800", "email": "a@example.com"}\n'
        '{"user_id": "u2", "email": "b\\udfff@example.com"}\n'
        '{"user_id": "u3", "email": "c@example.com"}\n'
    )
    write_members(fine, [1])

    first, second = sync(workspace, engine)

    assert (first.status, first.rejected, first.delivered) == ("succeeded", 2, 1)
    reasons = [r for (r,) in table(engine, select(rejected_rows.c.reason))]
    assert reasons == [
        "user_id contains control characters or invalid Unicode",
        "email contains control characters or invalid Unicode",
    ]
    assert second.status == "succeeded"


def test_an_unexpected_error_fails_only_its_audience(
    workspace: Workspace, engine: Engine, gist: FakeGist, monkeypatch: pytest.MonkeyPatch
) -> None:
    from audience_sync.sources import FileSource

    broken = add_audience(workspace, "broken")
    fine = add_audience(workspace, "fine")
    write_members(broken, [1])
    write_members(fine, [2])
    original = FileSource.read_chunks

    def read_chunks(self: FileSource, chunk_size: int = 5000) -> Any:
        if self.path == broken:
            raise RuntimeError("a bug in a reader")
        return original(self, chunk_size)

    monkeypatch.setattr(FileSource, "read_chunks", read_chunks)

    first, second = sync(workspace, engine)

    assert (first.status, first.error) == ("failed", "RuntimeError: a bug in a reader")
    assert (second.status, second.delivered) == ("succeeded", 1)
    statuses = dict(table(engine, select(sync_runs.c.audience_key, sync_runs.c.status)))
    assert statuses == {"broken": "failed", "fine": "succeeded"}


def test_a_bug_while_sending_an_event_fails_the_run_and_keeps_the_event_owed(
    workspace: Workspace, engine: Engine, gist: FakeGist, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception of our own in an event's task is no silent success: the run fails
    saying so (``internal``), and the event stays owed for a run without the bug."""
    from audience_sync import events

    write_members(add_audience(workspace, "k", send_track=True), [1])

    def broken(names: Any, row: Any) -> Any:
        raise KeyError("a bug in an event")

    monkeypatch.setattr(events, "build_event", broken)
    [run] = sync(workspace, engine)
    assert (run.status, run.failure) == ("failed", "internal"), run
    assert "KeyError" in (run.error or "")
    monkeypatch.undo()

    [again] = sync(workspace, engine)

    assert again.status == "succeeded"
    assert [e["event_name"] for e in gist.events()] == ["Audience Entered"]


# 9 ----------------------------------------------------------------------------------------


def test_retire_of_a_trait_with_only_uncertain_values_sends_null(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_trait(workspace)
    values(source, {"u1": 5, "u2": 6})
    sync_losing_answers(workspace, engine, gist)
    workspace.traits.clear()
    add_audience(workspace, "other")
    gist.clear_log()

    [run] = sync(workspace, engine, keys=[TRAIT], mode="retire")

    assert (run.status, run.exited) == ("succeeded", 2)
    assert held(gist, TRAIT) == {"u1": None, "u2": None}


def test_a_key_reused_from_trait_to_audience_is_retired_as_an_audience(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_trait(workspace, "k")
    values(source, {"u1": 5})
    sync(workspace, engine)
    workspace.traits.clear()
    add_audience(workspace, "other")
    sync(workspace, engine, keys=["k"], mode="retire")
    assert held(gist, "k") == {"u1": None}

    members = add_audience(workspace, "k")
    write_members(members, [1, 2])
    sync(workspace, engine)
    assert held(gist, "k") == {"u1": True, "u2": True}
    workspace.audiences[:] = [a for a in workspace.audiences if a["key"] != "k"]
    workspace.write_config()

    [run] = sync(workspace, engine, keys=["k"], mode="retire")

    assert (run.status, run.exited) == ("succeeded", 2)
    assert held(gist, "k") == {"u1": False, "u2": False}
    assert table(engine, select(memberships)) == []


def test_a_retired_key_owes_no_events_and_its_new_kind_sends_only_its_own(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """The long model profile's counterexample: an audience owed entry events (Gist refused
    events) when it was retired and added back as a tracked trait; the trait's runs met the
    audience's owed changes, could not build a trait event of them, and left them owed for
    ever while recording success. Retiring clears the key in Gist: the events its old values
    owed announce states Gist no longer holds, and are dropped with the reason."""
    workspace.gist_options["batch_size"] = 100
    members = add_audience(workspace, "k", send_track=True)
    write_members(members, [1, 2])
    gist.fail_after(1, 503)  # the contacts go through (one batch), the events do not
    sync(workspace, engine)
    gist.reset_faults()
    assert gist.events() == []
    workspace.audiences.clear()
    add_audience(workspace, "other")
    [retired] = sync(workspace, engine, keys=["k"], mode="retire")
    assert retired.status == "succeeded"
    source = add_trait(workspace, "k", send_track=True)
    values(source, {"u2": 7})
    gist.clear_log()

    results = sync(workspace, engine)

    assert [r.status for r in results] == ["succeeded", "succeeded"], results
    sent = [(e["user_id"], e["event_name"], e["properties"]) for e in gist.events()]
    assert sent == [("u2", "Trait Computed", {"trait_key": "k", "k": 7})]
    owed = select(func.count()).where(
        member_changes.c.event_status.in_(["pending", "failed"]),
        member_changes.c.status == "delivered",
    )
    with engine.connect() as connection:
        assert connection.scalar(owed) == 0
        reasons = connection.scalars(
            select(member_changes.c.event_error).where(member_changes.c.value.is_(True))
        ).all()
    assert reasons == ["not sent: the key was retired"] * 2


def test_exit_events_owed_by_an_emptied_audience_are_not_sent_as_its_trait(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """An audience whose members all left holds nothing, so its key may come back as a trait
    without a retire; the exits' events it still owed are no trait value: dropped, saying
    why, and the trait's own events go out."""
    workspace.gist_options["batch_size"] = 100
    members = add_audience(workspace, "k", send_track=True)
    write_members(members, [1])
    sync(workspace, engine)
    write_members(members, [])
    gist.fail_after(1, 503)  # the exit goes through, its event does not
    sync(workspace, engine, allow_mass_exit=True)
    gist.reset_faults()
    workspace.audiences.clear()
    values(add_trait(workspace, "k", send_track=True), {"u1": 3})
    before = len(gist.events())  # the entry's

    [run] = sync(workspace, engine)

    assert run.status == "succeeded", run
    sent = [(e["user_id"], e["event_name"], e["properties"]) for e in gist.events()[before:]]
    assert sent == [("u1", "Trait Computed", {"trait_key": "k", "k": 3})]
    with engine.connect() as connection:
        exits = connection.execute(
            select(member_changes.c.event_status, member_changes.c.event_error).where(
                member_changes.c.value.is_(False)
            )
        ).all()
    assert exits == [(None, "not sent: the key is a trait now")]


def test_switching_a_key_between_kinds_without_retiring_is_refused(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_trait(workspace, "k")
    values(source, {"u1": 5})
    sync(workspace, engine)
    workspace.traits.clear()
    members = add_audience(workspace, "k")
    write_members(members, [2])
    gist.clear_log()

    [run] = sync(workspace, engine)

    assert run.status == "failed"
    assert "still holds trait values" in (run.error or "")
    assert "audience-sync retire k" in (run.error or "")
    assert gist.requests() == []


# 10 ---------------------------------------------------------------------------------------


def test_integer_ids_in_any_type_are_one_user(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace)
    write_rows(
        source,
        [{"user_id": 42, "email": "a@example.com"}, {"user_id": 7, "email": "b@example.com"}],
    )
    sync(workspace, engine)
    write_rows(
        source,
        [{"user_id": 42.0, "email": "a@example.com"}, {"user_id": "7", "email": "b@example.com"}],
    )
    gist.clear_log()

    [run] = sync(workspace, engine)

    assert (run.entered, run.exited, run.rejected) == (0, 0, 0)
    assert gist.requests() == []
    assert held(gist, VIP) == {"42": True, "7": True}


def test_a_member_whose_row_is_rejected_stays_whatever_the_type_of_its_id(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    # A rejected row protects its user's membership (a broken email is no exit), which takes
    # the rejected row's id in the canonical form the membership has: 42.0 is user 42.
    source = add_audience(workspace)
    write_rows(
        source,
        [{"user_id": 42, "email": "a@example.com"}, {"user_id": 7, "email": "b@example.com"}],
    )
    sync(workspace, engine)
    write_rows(
        source,
        [{"user_id": 42.0, "email": "not an email"}, {"user_id": 7, "email": "b@example.com"}],
    )
    gist.clear_log()

    [run] = sync(workspace, engine)

    assert (run.status, run.rejected, run.exited) == ("succeeded", 1, 0)
    assert gist.requests() == []
    assert held(gist, VIP) == {"42": True, "7": True}
    assert table(engine, select(rejected_rows.c.user_id)) == [("42",)]


def test_fractional_ids_are_rejected_with_the_reason(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace)
    write_rows(
        source,
        [{"user_id": 42, "email": "a@example.com"}, {"user_id": 1, "email": "b@example.com"}],
    )
    sync(workspace, engine)
    write_rows(
        source,
        [{"user_id": 42.5, "email": "a@example.com"}, {"user_id": 1, "email": "b@example.com"}],
    )

    [run] = sync(workspace, engine)

    assert (run.rejected, run.exited) == (1, 1)  # 42.5 is not user 42, who left
    assert [r for (r,) in table(engine, select(rejected_rows.c.reason))] == [
        "user_id is not a whole number"
    ]


def test_a_run_whose_rows_are_all_rejected_fails(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace)
    write_members(source, [1, 2])
    sync(workspace, engine)
    write_rows(source, [{"user_id": 1, "email": "not an email"}, {"user_id": True, "email": "x"}])
    gist.clear_log()

    [run] = sync(workspace, engine)

    assert run.status == "failed"
    assert "all 2 rows were rejected" in (run.error or "")
    assert gist.requests() == []


@pytest.mark.postgres
def test_uuid_user_ids_from_postgresql(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    admin = require_postgres()
    ids = [uuid.uuid4() for _ in range(3)]
    rows = ", ".join(f"('{i}'::uuid, 'u{n}@example.com')" for n, i in enumerate(ids))
    workspace.add_sql_audience(
        "Uuids",
        admin,
        f"SELECT id AS user_id, email FROM (VALUES {rows}) AS t(id, email)",
        key="uuids",
    )
    [run] = sync(workspace, engine)

    assert (run.status, run.rejected, run.delivered) == ("succeeded", 0, 3)
    assert set(held(gist, "uuids")) == {str(i) for i in ids}


# 13 ---------------------------------------------------------------------------------------


def test_prune_keeps_changes_whose_event_is_owed(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace, send_track=True)
    write_members(source, [1, 2])
    gist.fail_next(100, 503)  # contacts go through below, events do not
    workspace.gist_options.update(max_retries=0)
    workspace.write_config()
    gist.reset_faults()
    sync(workspace, engine)
    with engine.begin() as connection:
        connection.execute(update(member_changes).values(event_status="pending"))
        connection.execute(update(sync_runs).values(started_at=utcnow().replace(year=2000)))

    deleted = prune(engine, utcnow())

    assert deleted["member_changes"] == 0
    gist.clear_log()
    sync(workspace, engine)
    assert len(gist.requests("/events")) == 2  # the owed events are still sent


def test_repair_resends_without_a_second_event(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace, send_track=True)
    write_members(source, [1])
    sync(workspace, engine)
    assert len(gist.requests("/events")) == 1
    save_repairs(engine, VIP, [("u1", "u1@example.com")])
    gist.clear_log()

    sync(workspace, engine)

    assert len(gist.requests("/contacts")) == 1
    assert gist.requests("/events") == []


def test_show_prints_trait_values(workspace: Workspace, engine: Engine, gist: FakeGist) -> None:
    source = add_trait(workspace)
    values(source, {"u1": 7, "u2": None, "u3": "gold"})
    [run] = sync(workspace, engine)

    shown = load_run(engine, run.run_id or 0)

    assert shown is not None
    assert {c["user_id"]: c["value"] for c in shown["changes"]} == {
        "u1": 7,
        "u2": None,
        "u3": "gold",
    }


def test_jsonl_with_a_byte_order_mark_is_read(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace)
    source.write_bytes(b'\xef\xbb\xbf{"user_id": "u1", "email": "a@example.com"}\n')

    [run] = sync(workspace, engine)

    assert (run.status, run.delivered, run.rejected) == ("succeeded", 1, 0)


def test_csv_naming_a_column_twice_is_refused(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    path = workspace.root / "vip.csv"
    path.write_text("user_id,email,email\nu1,a@example.com,b@example.com\n")
    workspace.audiences.append({"name": "Vip", "file": path.name})
    workspace.write_config()

    [run] = sync(workspace, engine)

    assert run.status == "failed"
    assert "header names 'email' more than once" in (run.error or "")
    assert gist.requests() == []


# 14 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["errors", "entries"])
def test_batch_answer_errors_do_not_acknowledge_those_contacts(
    workspace: Workspace, engine: Engine, gist: FakeGist, shape: str
) -> None:
    workspace.gist_options["batch_size"] = 10
    workspace.write_config()
    source = add_audience(workspace)
    write_members(source, range(5))
    gist.fail_in_batch("u3", shape=shape)

    [run] = sync(workspace, engine)

    assert run.status == "succeeded"
    batches = gist.requests("/contacts/batch")
    singles = [r.body["user_id"] for r in gist.requests("/contacts")]
    assert len(batches) == 1
    assert singles == ["u3"]  # reported failed in the batch: sent on its own
    acked = {u for (u,) in table(engine, select(memberships.c.user_id))}
    assert (
        acked == {u for u, v in held(gist, VIP).items() if v is True} == {f"u{n}" for n in range(5)}
    )


def test_batch_errors_that_name_no_contact_acknowledge_none(
    workspace: Workspace, engine: Engine
) -> None:
    import httpx

    singles: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/contacts/batch":
            return httpx.Response(200, json={"errors": [{"message": "something failed"}]})
        singles.append(json.loads(request.content)["user_id"])
        return httpx.Response(200, json={"contact": {}})

    workspace.gist_options["batch_size"] = 10
    workspace.write_config()
    source = add_audience(workspace)
    write_members(source, range(3))

    [run] = sync(workspace, engine, transport=httpx.MockTransport(handler))

    assert run.delivered == 3
    assert sorted(singles) == ["u0", "u1", "u2"]  # each acknowledged by its own request


@pytest.mark.parametrize("batch_size", [1, 10])
def test_a_bug_while_sending_fails_the_run_and_acknowledges_nothing(
    workspace: Workspace, engine: Engine, batch_size: int
) -> None:
    """An exception that is no answer from Gist (a bug of ours, here raised by the
    transport) stops delivery and fails the run with it. Before, one raised while sending
    a batch was lost with its task: the run ended "succeeded" with its changes pending."""
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug between us and Gist")

    workspace.gist_options["batch_size"] = batch_size
    workspace.write_config()
    source = add_audience(workspace)
    write_members(source, range(3))

    with pytest.raises(RuntimeError, match="a bug between us and Gist"):
        sync(workspace, engine, transport=httpx.MockTransport(handler))

    with engine.connect() as connection:
        assert connection.scalar(select(sync_runs.c.status)) == "failed"
        assert connection.scalar(select(func.count()).select_from(memberships)) == 0


class Halt(BaseException):
    """Neither an Exception nor KeyboardInterrupt/SystemExit (which leave asyncio's loop by
    themselves): the model's in-process kill is one."""


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_base_exception_raised_while_sending_ends_the_delivery_at_once(
    workspace: Workspace, engine: Engine, gist: FakeGist, batch_size: int
) -> None:
    """The model's counterexample: its in-process kill, raised by the progress callback in
    every sender, ended each sender's task; the delivery loop then waited for room in their
    queue for ever (the CI profile hung). It now stops at once and re-raises it, saving
    nothing more, as a kill would."""

    class Kill:
        def loaded(self, audience_key: str, rows: int) -> None: ...
        def planned(self, changes: int) -> None: ...
        def sent(self, changes: int) -> None:
            raise Halt

    workspace.gist_options.update(batch_size=batch_size, max_concurrency=2)
    write_members(add_audience(workspace), range(40))

    with pytest.raises(Halt):
        sync(workspace, engine, progress=Kill())

    assert len(gist.requests("/contacts") + gist.requests("/contacts/batch")) <= 2
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(memberships)) == 0
    [again] = sync(workspace, engine)
    assert again.status == "succeeded"
    assert len(held(gist, VIP)) == 40


def test_migration_0004_records_kinds_and_contacts(state_url: str) -> None:
    from audience_sync import db

    engine = db.make_engine(state_url)
    try:
        db.upgrade(engine, "0003")
        now = utcnow()
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO audiences (key, name, source) VALUES "
                    "('a', 'A', 's'), ('t', 'T', 's'), ('both', 'B', 's')"
                )
            )
            for key, user, email, run_id in (
                ("a", "u1", "old@example.com", 1),
                ("both", "u1", "new@example.com", 2),
            ):
                connection.execute(
                    memberships.insert().values(
                        audience_key=key, user_id=user, email=email, since=now, last_run_id=run_id
                    )
                )
            for key in ("t", "both"):
                connection.execute(
                    trait_values.insert().values(
                        trait_key=key,
                        user_id="u2",
                        email="t@example.com",
                        value="1",
                        since=now,
                        last_run_id=1,
                    )
                )
        db.upgrade(engine)
        kinds = dict(table(engine, select(audiences.c.key, audiences.c.kind)))
        emails = dict(table(engine, text("SELECT user_id, email FROM contacts")))
    finally:
        engine.dispose()
    assert kinds == {"a": "audience", "t": "trait", "both": None}
    assert emails == {"u1": "new@example.com", "u2": "t@example.com"}


# Found by the model-based test (tests/test_model.py), kept as named regressions -----------


def test_backfill_of_a_member_gist_never_acknowledged_owes_its_entered_event(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    # Shrunk example: enter u2 into a tracked audience; backfill; a clean run. The backfill
    # acknowledged u2's entry, but no `Audience Entered` was ever sent.
    source = add_audience(workspace, send_track=True)
    write_members(source, [2])

    sync(workspace, engine, mode="backfill")
    sync(workspace, engine)

    assert [(e["user_id"], e["event_name"]) for e in gist.events()] == [("u2", "Audience Entered")]
    sync(workspace, engine, mode="backfill")  # a member already acknowledged: no second one
    assert len(gist.events()) == 1


def test_a_run_cut_short_while_loading_is_recorded_and_leaves_no_snapshot(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    # Shrunk example: a run stopped by Ctrl-C (or any BaseException) while its source was
    # being staged stayed `running`, and its staged rows were never cleared.
    source = add_audience(workspace)
    write_members(source, [1, 2])

    class Interrupt:
        def loaded(self, audience_key: str, rows: int) -> None:
            raise KeyboardInterrupt

        def planned(self, changes: int) -> None: ...

        def sent(self, changes: int) -> None: ...

    with pytest.raises(KeyboardInterrupt):
        sync(workspace, engine, progress=Interrupt())

    with engine.connect() as connection:
        statuses = list(connection.scalars(select(sync_runs.c.status)))
        tables = set(inspect(connection).get_table_names())
    assert statuses == ["interrupted"]
    assert not {t for t in tables if t.startswith("staged")}  # snapshots died with the run
    [run] = sync(workspace, engine)
    assert (run.status, run.entered, run.delivered) == ("succeeded", 2, 2)
    assert {u for u, v in held(gist, VIP).items() if v is True} == {"u1", "u2"}


def test_keep_resends_the_last_value_of_an_uncertain_user_who_left(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    # With on_missing = "keep", a user who left while their last value went unanswered was
    # never planned again: uncertain forever, and trait_values disagreeing with Gist.
    source = add_trait(workspace, on_missing="keep")
    values(source, {"u1": 1, "u2": 2})
    sync(workspace, engine)
    values(source, {"u1": 5, "u2": 2})
    sync_losing_answers(workspace, engine, gist)
    values(source, {"u2": 2})  # u1 leaves: keep their last value, 5

    [run] = sync(workspace, engine)

    assert run.status == "succeeded"
    assert held(gist, TRAIT) == {"u1": 5, "u2": 2}
    assert table(engine, select(uncertain_members.c.user_id)) == []
    assert dict(table(engine, select(trait_values.c.user_id, trait_values.c.value))) == {
        "u1": "5",
        "u2": "2",
    }


def test_keep_never_takes_a_dry_runs_value_for_one_attempted(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    # A dry run plans without sending: its value was never attempted, so a user who then
    # leaves keeps the last value really sent (5), not the dry run's (9). Found by
    # benchmarks/mutation.py.
    source = add_trait(workspace, on_missing="keep")
    values(source, {"u1": 1, "u2": 2})
    sync(workspace, engine)
    values(source, {"u1": 5, "u2": 2})
    sync_losing_answers(workspace, engine, gist)
    values(source, {"u1": 9, "u2": 2})
    assert sync(workspace, engine, dry_run=True)[0].kind == "dry-run"
    values(source, {"u2": 2})

    [run] = sync(workspace, engine)

    assert run.status == "succeeded"
    assert held(gist, TRAIT) == {"u1": 5, "u2": 2}


def test_audiences_disagreeing_on_an_email_in_separate_runs_do_not_resend_forever(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    vip = add_audience(workspace)
    other = add_audience(workspace, "other")
    write_members(vip, [("u1", "a@example.com")])
    write_members(other, [("u1", "b@example.com")])
    sync(workspace, engine, keys=[VIP])
    sync(workspace, engine, keys=["other"])
    gist.clear_log()

    # The first configured source's email wins: vip's next run, finding the contact's email
    # moved by other's, sends its own again, once; other's runs leave it (vip, configured
    # first and not run with them, holds the user). Then nothing, for ever.
    [first] = sync(workspace, engine, keys=[VIP])
    assert (first.entered, first.resent) == (0, 1)
    assert gist.contacts()["u1"]["email"] == "a@example.com"
    gist.clear_log()
    for key in ("other", VIP, "other", VIP):  # e.g. daemon jobs on different schedules
        [run] = sync(workspace, engine, keys=[key])
        assert (run.entered, run.resent) == (0, 0)

    assert gist.requests() == []


def test_a_refused_event_holds_back_its_users_later_events(
    workspace: Workspace, engine: Engine, gist: FakeGist, caplog: pytest.LogCaptureFixture
) -> None:
    """A review's counterexample: Gist refused (4xx) u0's `Audience Entered`, which stays
    owed; u0 left, and the next run had the entry refused again but sent the exit, so the
    run after that sent the entry last and Gist's timeline ended on "entered" for a contact
    out of the audience. A refused event now holds back its user's later events of the key
    for the run: they go out after it, in order, once Gist takes it."""
    workspace.gist_options["batch_size"] = 100
    source = add_audience(workspace, send_track=True)
    write_members(source, [0, 1])
    gist.refuse_events("u0", 1)
    [first] = sync(workspace, engine)
    assert first.status == "succeeded"
    # Succeeded (Gist holds every value), and the refusal said all the same:
    assert (
        "vip: Gist refused 1 event (first: user u0: HTTP 422: Event refused); still owed, "
        "sent again by the next run"
    ) in caplog.text
    write_members(source, [1])
    gist.refuse_events("u0", 1)  # the owed entry again; the exit would be taken

    [second] = sync(workspace, engine, allow_mass_exit=True)

    assert second.status == "succeeded"
    assert [(e["user_id"], e["event_name"]) for e in gist.events()] == [("u1", "Audience Entered")]
    [third] = sync(workspace, engine)
    assert third.status == "succeeded"
    assert [(e["user_id"], e["event_name"]) for e in gist.events()] == [
        ("u1", "Audience Entered"), ("u0", "Audience Entered"), ("u0", "Audience Exited"),
    ]  # fmt: skip
    assert held(gist, VIP) == {"u0": False, "u1": True}


def test_events_owed_when_send_track_is_turned_off_are_not_sent_when_it_is_back_on(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """A review's counterexample: entry events left owed (Gist down for events) outlived
    `send_track = false`; u0 left while it was off (an exit with no event), and turning it
    back on sent u0's old `Audience Entered` for a contact out of the audience. A run that
    plans a key without `send_track` drops the events it still owes, saying why."""
    workspace.gist_options["batch_size"] = 100
    source = add_audience(workspace, send_track=True)
    write_members(source, [0, 1])
    gist.fail_after(1, 503)  # the contacts go through (one batch), the events do not
    sync(workspace, engine)
    gist.reset_faults()
    workspace.audiences[0]["send_track"] = False
    workspace.write_config()
    write_members(source, [1])
    sync(workspace, engine, allow_mass_exit=True)
    workspace.audiences[0]["send_track"] = True
    workspace.write_config()

    [run] = sync(workspace, engine)

    assert run.status == "succeeded"
    assert gist.events() == []
    assert held(gist, VIP) == {"u0": False, "u1": True}
    reasons = table(
        engine,
        select(member_changes.c.user_id, member_changes.c.event_error)
        .where(member_changes.c.value.is_(True))
        .order_by(member_changes.c.user_id),
    )
    assert [tuple(r) for r in reasons] == [
        ("u0", "not sent: send_track was turned off"),
        ("u1", "not sent: send_track was turned off"),
    ]


@pytest.mark.parametrize("old", ["trait", "audience"])
def test_a_run_refusing_to_switch_a_keys_kind_sends_none_of_its_old_events(
    workspace: Workspace, engine: Engine, gist: FakeGist, old: str
) -> None:
    """A review's counterexample: a tracked trait's event was owed (Gist down for events)
    when the config made its key an audience; the run refused the key (it still holds trait
    values) yet sent the owed change's event in the audience's names (`Audience Exited`,
    from a NULL entry), marking it delivered. The other way round the event could not be
    built and failed every other audience's run. Events go out only from changes of the
    kind their key is configured as; the old kind's stay owed until a retire drops them."""
    workspace.gist_options["batch_size"] = 100
    if old == "trait":
        values(add_trait(workspace, "k", send_track=True), {"u1": 5})
    else:
        write_members(add_audience(workspace, "k", send_track=True), [1])
    gist.fail_after(1, 503)  # the contact goes through, its event does not
    sync(workspace, engine)
    gist.reset_faults()
    workspace.audiences.clear()
    workspace.traits.clear()
    if old == "trait":
        write_members(add_audience(workspace, "k", send_track=True), [2])
    else:
        values(add_trait(workspace, "k", send_track=True), {"u1": 3})
    write_members(add_audience(workspace, "other", send_track=True), [7])

    results = {r.audience_key: r for r in sync(workspace, engine)}

    assert results["k"].status == "failed"
    assert "still holds" in (results["k"].error or "")
    assert results["other"].status == "succeeded", results["other"]
    assert [(e["user_id"], e["event_name"]) for e in gist.events()] == [("u7", "Audience Entered")]
    owed = select(func.count()).where(
        member_changes.c.audience_key == "k",
        member_changes.c.status == "delivered",
        member_changes.c.event_status == "pending",
    )
    with engine.connect() as connection:
        assert connection.scalar(owed) == 1  # the old kind's, until a retire drops it


def test_an_owed_entry_event_arrives_before_the_exit_that_followed_it(
    workspace: Workspace, engine: Engine
) -> None:
    # The long model profile's counterexample (SQLite): a 401 left u0's `Audience Entered`
    # owed; u0 then left, and the next run sent the owed entry and the new exit side by
    # side, so the exit could arrive first and Gist's timeline ended on "entered". One
    # user's events now go out one after another, in the order of their changes.
    import asyncio

    import httpx

    seen: list[tuple[str, str, str]] = []  # (user, event, "start" | "end")
    refuse_events = True

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/events":
            return httpx.Response(200, json={"contact": {}})
        if refuse_events:
            return httpx.Response(401, json={"errors": [{"message": "Unauthorized"}]})
        body = json.loads(request.content)
        user, name = body["user_id"], body["event_name"]
        seen.append((user, name, "start"))
        if name == "Audience Entered":
            await asyncio.sleep(0.2)  # the older event answers last
        seen.append((user, name, "end"))
        return httpx.Response(200, json={})

    source = add_audience(workspace, send_track=True)
    write_members(source, [0, 1])
    [first] = sync(workspace, engine, transport=httpx.MockTransport(handler))
    assert first.delivered == 2  # both contacts acknowledged, both entry events owed
    write_members(source, [1])
    refuse_events = False

    [second] = sync(workspace, engine, transport=httpx.MockTransport(handler))

    assert second.status == "succeeded"
    assert seen.index(("u0", "Audience Exited", "start")) > seen.index(
        ("u0", "Audience Entered", "end")
    )
    assert ("u1", "Audience Entered", "end") in seen
    statuses = table(
        engine,
        select(
            member_changes.c.user_id, member_changes.c.value, member_changes.c.event_status
        ).order_by(member_changes.c.id),
    )
    assert [tuple(r) for r in statuses] == [
        ("u0", True, "delivered"), ("u1", True, "delivered"), ("u0", False, "delivered"),
    ]  # fmt: skip


def test_an_owed_event_sent_after_an_email_change_carries_the_current_email(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """u0 enters with old@; its contact is acknowledged but Gist is down for events, so the
    `Audience Entered` stays owed. The source then gives u0 new@: the next run re-sends the
    contact with new@ (Gist's contact email follows the source), then sends the owed event
    built from the old change row, i.e. with old@ — a request that does not carry the
    user's current email (DESIGN: "Every request carries the user's current email"). Owed
    events now carry the email Gist last acknowledged for the contact."""
    source = add_audience(workspace, send_track=True)
    write_members(source, [("u0", "old@example.com")])
    gist.fail_after(1, 503)  # the contact goes through, the event does not
    sync(workspace, engine)
    gist.reset_faults()
    assert gist.events() == []

    write_members(source, [("u0", "new@example.com")])
    [run] = sync(workspace, engine)

    assert run.status == "succeeded"
    assert gist.contacts()["u0"]["email"] == "new@example.com"
    [event] = gist.events()
    assert (event["event_name"], event["email"]) == ("Audience Entered", "new@example.com")


def test_an_event_refused_for_its_email_goes_out_once_the_source_fixes_the_email(
    workspace: Workspace, engine: Engine
) -> None:
    """docs/troubleshooting.md: Gist refused track events with a 4xx, "often the email":
    "fix what Gist refuses ...; each run tries again". Here Gist refuses events carrying
    bad@ (it takes the contact). The operator fixes u0's email in the source; the contact is
    re-sent with the fixed email, but the owed event is rebuilt from its change row, still
    carrying bad@, so Gist refuses it on every run for ever — and because a refused event
    holds back the user's later events of the key, u0's `Audience Exited` is never sent
    either. Nothing the operator could do in the source released them; now the fixed email,
    once Gist acknowledges the contact with it, is the one the owed event carries."""
    contacts: dict[str, dict[str, Any]] = {}
    accepted: list[tuple[str, str, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/contacts":
            contacts[body["user_id"]] = body
            return httpx.Response(200, json={"contact": body})
        if body.get("email") == "bad@example.com":
            return httpx.Response(422, json={"errors": [{"message": "Email is not allowed"}]})
        accepted.append((body["user_id"], body["event_name"], body.get("email", "")))
        return httpx.Response(200, json={"event": body})

    transport = httpx.MockTransport(handler)
    source = add_audience(workspace, send_track=True)
    write_members(source, [("u0", "bad@example.com"), 1])
    sync(workspace, engine, transport=transport)
    assert accepted == [("u1", "Audience Entered", "u1@example.com")]

    write_members(source, [("u0", "good@example.com"), 1])  # the operator's fix
    sync(workspace, engine, transport=transport)
    sync(workspace, engine, transport=transport)  # "each run tries again"
    assert contacts["u0"]["email"] == "good@example.com"

    write_members(source, [1])  # u0 leaves
    sync(workspace, engine, transport=transport)
    sync(workspace, engine, transport=transport)

    assert contacts["u0"]["custom_properties"] == {VIP: False}
    assert [a for a in accepted if a[0] == "u0"] == [
        ("u0", "Audience Entered", "good@example.com"),
        ("u0", "Audience Exited", "good@example.com"),
    ]


def test_an_exit_sent_by_a_run_of_one_key_leaves_no_email_the_first_source_does_not_give(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """u1 is in a (configured first, email A) and b (email B); the daemon runs each key in
    its own invocation: a's run sends A, b's sends B (its source alone). u1 leaves b: b's run
    sends the exit with the contact's last acknowledged email, B. Only a has u1 now, saying
    A, yet no run sent A again — a's diff compared its source with its own record of u1
    (A), never with the contact's. A member whose contact's email another key moved is now
    sent again when it is not the one this run's sources give."""
    a, b = add_audience(workspace, "a"), add_audience(workspace, "b")
    u1 = {"user_id": "u1", "email": "A@example.com"}
    others = [{"user_id": u, "email": f"{u}@example.com"} for u in ("u2", "u3")]
    write_rows(a, [u1])
    write_rows(b, [{**u1, "email": "B@example.com"}, *others])
    run_once(workspace.settings(), engine, ["a"])
    run_once(workspace.settings(), engine, ["b"])
    write_rows(b, others)
    run_once(workspace.settings(), engine, ["b"])
    assert gist.contacts()["u1"]["custom_properties"] == {"a": True, "b": False}
    assert gist.contacts()["u1"]["email"] == "B@example.com"

    [run, _] = sync(workspace, engine)

    assert (run.audience_key, run.resent, run.entered) == ("a", 1, 0)
    assert gist.contacts()["u1"]["email"] == "A@example.com"
    gist.clear_log()
    sync(workspace, engine, full_diff=True)
    run_once(workspace.settings(), engine, ["a"], full_diff=True)
    run_once(workspace.settings(), engine, ["b"], full_diff=True)
    assert gist.requests() == []


def test_an_exit_sent_by_a_run_of_one_trait_leaves_no_email_the_first_source_does_not_give(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """The traits' version (a review found the first fix covered audiences only): t1
    (configured first) gives u1 A, t2 gives B; each runs alone, then u1 leaves t2 (its
    `null` goes out with the contact's email, B). Only t1 has u1 now, saying A: its next
    run sends A again, its value unchanged; after it, nothing more."""
    t1, t2 = add_trait(workspace, "t1"), add_trait(workspace, "t2")
    write_rows(t1, [{"user_id": "u1", "email": "A@example.com", "value": 1}])
    others = [{"user_id": u, "email": f"{u}@example.com", "value": 1} for u in ("u2", "u3")]
    write_rows(t2, [{"user_id": "u1", "email": "B@example.com", "value": 1}, *others])
    run_once(workspace.settings(), engine, ["t1"])
    run_once(workspace.settings(), engine, ["t2"])
    write_rows(t2, others)
    run_once(workspace.settings(), engine, ["t2"])
    assert gist.contacts()["u1"]["custom_properties"] == {"t1": 1, "t2": None}
    assert gist.contacts()["u1"]["email"] == "B@example.com"

    [run, _] = sync(workspace, engine)

    assert (run.audience_key, run.resent, run.entered) == ("t1", 1, 0)
    assert gist.contacts()["u1"]["email"] == "A@example.com"
    gist.clear_log()
    sync(workspace, engine, full_diff=True)
    run_once(workspace.settings(), engine, ["t1"])
    run_once(workspace.settings(), engine, ["t2"])
    assert gist.requests() == []
