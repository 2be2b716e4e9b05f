"""Backfill (resend everything, resumably) and retire (unset a removed audience, forget it)."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import Engine, func, select

from audience_sync.errors import ConfigError
from audience_sync.fakegist import FakeGist
from audience_sync.models import uncertain_members
from audience_sync.sync import run_once
from tests.conftest import Workspace, write_members
from tests.helpers import KEY, acknowledged, in_gist, users


def sends(gist: FakeGist) -> Counter[str]:
    return Counter(r.body["user_id"] for r in gist.requests("/contacts") if r.status == 200)


def test_backfill_resends_every_member(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(10))
    run_once(workspace.settings(), engine)
    gist.clear_log()

    [backfill] = run_once(workspace.settings(), engine, [KEY], mode="backfill")

    assert (backfill.kind, backfill.status, backfill.entered, backfill.delivered) == (
        "backfill", "succeeded", 10, 10,
    )  # fmt: skip
    assert sends(gist) == Counter({f"u{n}": 1 for n in range(10)})
    assert all(r.body["custom_properties"] == {KEY: True} for r in gist.requests("/contacts"))


def test_a_backfill_resends_a_member_whose_row_it_rejected(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """A rejected row keeps its user's membership (a broken email is no exit). A backfill
    after a Gist reset sent only the staged members: the one whose row was broken that day
    was left without the property for good, the state saying Gist holds it. It is sent
    again with the email Gist acknowledged, owing no event."""
    source = workspace.add_file_audience("Order Completed Last 30days", send_track=True)
    write_members(source, range(3))
    run_once(workspace.settings(), engine)
    for user in ("u0", "u1", "u2"):  # the workspace is reset
        gist.drop_property(user, KEY)
    write_members(source, [0, ("u1", "not an email"), 2])
    announced = len(gist.events())
    gist.clear_log()

    [backfill] = run_once(workspace.settings(), engine, [KEY], mode="backfill")

    assert (backfill.status, backfill.rejected, backfill.delivered) == ("succeeded", 1, 3)
    assert in_gist(gist) == acknowledged(engine) == users(0, 1, 2)
    assert {r.body["user_id"]: r.body["email"] for r in gist.requests("/contacts")}["u1"] == (
        "u1@example.com"
    )
    assert len(gist.events()) == announced
    write_members(source, range(3))  # the row mended
    gist.clear_log()
    [run] = run_once(workspace.settings(), engine)
    assert (run.entered, run.exited, gist.requests()) == (0, 0, [])


def test_backfill_after_a_crash_resumes_when_asked_instead_of_starting_over(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    workspace.gist_options.update(max_concurrency=1, max_retries=0)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(30))
    gist.fail_after(12, 503)  # the first backfill dies after 12

    [first] = run_once(workspace.settings(), engine, [KEY], mode="backfill")
    assert (first.status, first.delivered) == ("failed", 12)

    gist.reset_faults()
    [second] = run_once(workspace.settings(), engine, [KEY], mode="backfill", resume=True)

    assert (second.status, second.entered, second.delivered) == ("succeeded", 18, 18)
    assert sends(gist) == Counter({f"u{n}": 1 for n in range(30)})  # nobody twice
    assert acknowledged(engine) == in_gist(gist) == users(*range(30))

    gist.clear_log()
    [fresh] = run_once(workspace.settings(), engine, [KEY], mode="backfill", resume=True)
    assert fresh.delivered == 30  # the last backfill finished: a new one starts over


def test_a_backfill_starts_over_unless_told_to_resume(
    workspace: Workspace, engine: Engine, gist: FakeGist, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the model: a backfill stopped (the key revoked after its first request),
    Gist was reset — what a backfill is for — and the next backfill, "resuming", skipped the
    user the stopped one had reached, leaving it without the property for good (the ledger
    says member, so no run sends it). Nothing the tool can see tells a reset happened: a
    backfill resumes only when the operator says so (``--resume``)."""
    workspace.gist_options.update(max_concurrency=1, max_retries=0)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(10))
    gist.fail_after(4, 401)
    [stopped] = run_once(workspace.settings(), engine, [KEY], mode="backfill")
    assert (stopped.status, stopped.delivered) == ("failed", 4)
    gist.reset_faults()
    for user in gist.contacts():  # the four it reached
        gist.drop_property(user, KEY)

    [backfill] = run_once(workspace.settings(), engine, [KEY], mode="backfill")

    assert (backfill.status, backfill.delivered) == ("succeeded", 10)
    assert in_gist(gist) == acknowledged(engine) == users(*range(10))
    assert f"the backfill of runs {stopped.run_id} did not finish; starting over" in caplog.text


def test_a_resumed_backfill_reaches_back_no_further_than_one_that_started_over(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """A backfill stopped, Gist was reset, a backfill started over and stopped too: resuming
    it skips whom *it* reached, not whom the one before the reset reached."""
    workspace.gist_options.update(max_concurrency=1, max_retries=0)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(10))
    gist.fail_after(6, 401)
    run_once(workspace.settings(), engine, [KEY], mode="backfill")  # reaches u0-u5
    gist.reset_faults()
    for user in gist.contacts():
        gist.drop_property(user, KEY)
    gist.fail_after(3, 401)
    [over] = run_once(workspace.settings(), engine, [KEY], mode="backfill")  # u0-u2 again
    assert (over.resumed, over.delivered) == (False, 3)
    gist.reset_faults()
    gist.clear_log()

    [resumed] = run_once(workspace.settings(), engine, [KEY], mode="backfill", resume=True)

    assert (resumed.status, resumed.resumed, resumed.delivered) == ("succeeded", True, 7)
    assert sends(gist) == Counter({f"u{n}": 1 for n in range(3, 10)})
    assert in_gist(gist) == acknowledged(engine) == users(*range(10))


@pytest.mark.parametrize("between", ["gist-reset", "left-and-came-back"])
def test_a_backfill_after_another_run_of_its_key_starts_over(
    workspace: Workspace, engine: Engine, gist: FakeGist, between: str
) -> None:
    """A review's counterexample: a backfill that stopped was "resumed" by one much later,
    after regular runs, skipping the users it had reached. Gist reset in between (what a
    backfill is for), they stayed without the property for good (the ledger says members,
    so no run sends them); a user who left (its exit sent) and came back was left `false`.
    A run of another kind of the key ends what a backfill resumes."""
    workspace.gist_options.update(max_concurrency=1, max_retries=0)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(10))
    run_once(workspace.settings(), engine)
    gist.fail_after(4, 503)  # the backfill stops after 4
    [stopped] = run_once(workspace.settings(), engine, [KEY], mode="backfill")
    assert (stopped.status, stopped.delivered) == ("failed", 4)
    gist.reset_faults()
    if between == "gist-reset":
        run_once(workspace.settings(), engine)  # a regular run, nothing to send
        for n in range(10):
            gist.drop_property(f"u{n}", KEY)
    else:
        write_members(source, range(1, 10))
        [left] = run_once(workspace.settings(), engine)  # u0 (reached by the backfill) leaves
        assert left.exited == 1
        write_members(source, range(10))

    [backfill] = run_once(workspace.settings(), engine, [KEY], mode="backfill")

    assert (backfill.status, backfill.delivered) == ("succeeded", 10)
    assert in_gist(gist) == acknowledged(engine) == users(*range(10))


def test_backfill_dry_run_sends_nothing(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(4))
    [run] = run_once(workspace.settings(), engine, [KEY], mode="backfill", dry_run=True)
    assert (run.kind, run.status, run.entered) == ("backfill-dry-run", "succeeded", 4)
    assert gist.requests() == []


def test_retire_unsets_a_removed_audience_and_forgets_it(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    old = workspace.add_file_audience("Order Completed Last 30days")
    kept = workspace.add_file_audience("Newsletter Signups")
    write_members(old, range(6))
    write_members(kept, [1])
    run_once(workspace.settings(), engine)

    with pytest.raises(ConfigError, match="still configured"):
        run_once(workspace.settings(), engine, [KEY], mode="retire")

    workspace.audiences.pop(0)
    workspace.write_config()
    gist.fail_after(3, 503)
    workspace.gist_options["max_retries"] = 0
    workspace.write_config()
    [broken] = run_once(workspace.settings(), engine, [KEY], mode="retire")
    assert broken.status == "failed"
    gist.reset_faults()
    [retired] = run_once(workspace.settings(), engine, [KEY], mode="retire")

    assert (retired.kind, retired.status) == ("retire", "succeeded")
    assert broken.delivered + retired.delivered == 6
    assert gist.properties(KEY) == dict.fromkeys(users(*range(6)), False)
    assert acknowledged(engine) == set()
    with engine.connect() as connection:
        left = connection.scalar(
            select(func.count()).where(uncertain_members.c.audience_key == KEY)
        )
    assert left == 0
    assert gist.properties("newsletter_signups") == {"u1": True}
