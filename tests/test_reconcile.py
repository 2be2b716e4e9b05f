"""``reconcile``: what Gist holds becomes the ledger, so switching over from Segment's Gist
destination re-sends nobody and re-fires no ``Audience Entered``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from audience_sync.fakegist import FakeGist
from audience_sync.models import gist_holdings, reconciles, sync_runs
from audience_sync.reconcile import reconcile
from audience_sync.sync import run_once
from tests.conftest import API_KEY, Workspace, write_members
from tests.helpers import acknowledged, in_gist, users

VIP = "vip"
SCORE = "score"


def segment_left(gist: FakeGist) -> None:
    """Gist as Segment's destination left it: u0-u5 members (u5 stale: it left the source
    since), u6 a member with another email, u10 unrelated, two leads; u7-u9 unknown."""
    for n in range(5):
        gist.add_contact(f"u{n}", f"u{n}@example.com", {VIP: True, "plan": "pro"})
    gist.add_contact("u5", "u5@example.com", {VIP: True})
    gist.add_contact("u6", "old6@example.com", {VIP: True})
    gist.add_contact("u10", "u10@example.com", {"plan": "free"})
    gist.add_contact(None, "lead1@example.com", {VIP: True})
    gist.add_contact(None, "lead2@example.com")
    gist.add_contact("u11", "u11@example.com", {VIP: False})


@pytest.fixture
def source(workspace: Workspace) -> Path:
    """The source now: u0-u4, u6 (its email as the source says) and u7-u9 new."""
    path = workspace.add_file_audience("VIP", key=VIP, send_track=True)
    write_members(path, [*range(5), 6, 7, 8, 9])
    return path


def paging(gist: FakeGist) -> list[int]:
    """The page numbers of every list request the fake answered."""
    return [r.page for r in gist.requests("/contacts") if r.page is not None]


def test_reconcile_sends_nothing_and_the_next_run_sends_only_the_differences(
    workspace: Workspace, engine: Engine, gist: FakeGist, source: Path
) -> None:
    segment_left(gist)

    report = reconcile(workspace.settings(), engine, per_page=3)

    assert {(r.method, r.path) for r in gist.requests()} == {("GET", "/contacts")}
    assert gist.events() == []
    [result] = report.results
    assert (result.kind, result.status) == ("reconcile", "succeeded")
    assert (report.contacts, report.leads, report.pages) == (11, 2, 4)
    # Gist holds u0-u6 (u6 with another email); the source adds u7-u9 and drops u5.
    assert (result.members, result.entered, result.exited, result.resent) == (7, 3, 1, 1)
    assert acknowledged(engine, VIP) == users(*range(7))
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(gist_holdings)) == 0
        assert connection.scalar(select(func.count()).select_from(reconciles)) == 0
        recorded = connection.execute(select(sync_runs)).one()
    assert (recorded.kind, recorded.contacts_read, recorded.pages_read, recorded.leads) == (
        "reconcile", 11, 4, 2,
    )  # fmt: skip
    gist.clear_log()

    [run] = run_once(workspace.settings(), engine)

    sent = {r.body["user_id"]: r.body for r in gist.requests("/contacts")}
    assert set(sent) == {"u5", "u6", "u7", "u8", "u9"}
    assert sent["u5"]["custom_properties"] == {VIP: False}
    assert sent["u6"]["email"] == "u6@example.com"  # the source's email, no event for it
    assert (run.entered, run.exited, run.resent) == (3, 1, 1)
    names = Counter((e["user_id"], e["event_name"]) for e in gist.events())
    assert names == Counter(
        {("u7", "Audience Entered"): 1, ("u8", "Audience Entered"): 1,
         ("u9", "Audience Entered"): 1, ("u5", "Audience Exited"): 1}
    )  # fmt: skip
    assert in_gist(gist, VIP) == users(*range(5), 6, 7, 8, 9) | {"lead1@example.com"}
    gist.clear_log()
    [again] = run_once(workspace.settings(), engine)
    assert (again.status, gist.requests()) == ("succeeded", [])


def test_a_dry_run_counts_the_differences_and_records_no_ledger(
    workspace: Workspace, engine: Engine, gist: FakeGist, source: Path
) -> None:
    segment_left(gist)

    report = reconcile(workspace.settings(), engine, dry_run=True, per_page=4)

    [result] = report.results
    assert (result.kind, result.entered, result.exited, result.resent) == ("dry-reconcile", 3, 1, 1)
    assert acknowledged(engine, VIP) == set()
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(reconciles)) == 0


def test_trait_values_are_read_by_value(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    path = workspace.root / "score.jsonl"
    path.write_text(
        '{"user_id": "u1", "email": "u1@example.com", "value": 3}\n'
        '{"user_id": "u2", "email": "u2@example.com", "value": "gold"}\n'
    )
    workspace.traits.append({"name": "Score", "key": SCORE, "file": path.name})
    workspace.write_config()
    gist.add_contact("u1", "u1@example.com", {SCORE: 3})
    gist.add_contact("u2", "u2@example.com", {SCORE: 2})
    gist.add_contact("u3", "u3@example.com", {SCORE: 1.5})

    [result] = reconcile(workspace.settings(), engine).results

    assert (result.members, result.entered, result.exited) == (3, 1, 1)
    gist.clear_log()
    run_once(workspace.settings(), engine)
    sent = {r.body["user_id"]: r.body["custom_properties"] for r in gist.requests("/contacts")}
    assert sent == {"u2": {SCORE: "gold"}, "u3": {SCORE: None}}


@pytest.mark.parametrize("batch_size", [1, 100])
def test_a_contact_gist_holds_without_an_email_is_sent_its_exit_without_one(
    workspace: Workspace, engine: Engine, gist: FakeGist, source: Path, batch_size: int
) -> None:
    """Reconcile finds members and trait values on contacts that have no email in Gist
    (created by user id alone). When they leave, their ``false`` (and ``null``) and their
    ``Audience Exited`` go out by user id: an empty email is no address, and a Gist that
    refuses it would refuse the exit on every run, leaving the user a member for good."""
    scores = workspace.root / "score.jsonl"
    scores.write_text('{"user_id": "u1", "email": "u1@example.com", "value": 3}\n')
    workspace.traits.append({"name": "Score", "key": SCORE, "file": scores.name})
    workspace.gist_options["batch_size"] = batch_size
    workspace.write_config()
    write_members(source, [1])
    gist.add_contact("u1", "u1@example.com", {VIP: True, SCORE: 3})
    gist.add_contact("u2", None, {VIP: True, SCORE: 5})  # no email: left the sources since

    reconcile(workspace.settings(), engine)
    gist.clear_log()
    results = run_once(workspace.settings(), engine)

    assert [(r.audience_key, r.status, r.exited) for r in results] == [
        (VIP, "succeeded", 1), (SCORE, "succeeded", 1),
    ]  # fmt: skip
    assert gist.properties(VIP) == {"u1": True, "u2": False}
    assert gist.properties(SCORE) == {"u1": 3, "u2": None}
    bodies = [r.body for r in gist.requests("/contacts")] + [
        c for r in gist.requests("/contacts/batch") for c in r.body["contacts"]
    ]
    assert {b["user_id"] for b in bodies} == {"u2"}
    assert all("email" not in b for b in bodies)
    [event] = gist.events()
    assert (event["user_id"], event["event_name"], "email" in event) == (
        "u2", "Audience Exited", False,
    )  # fmt: skip
    gist.clear_log()
    assert [r.status for r in run_once(workspace.settings(), engine)] == ["succeeded"] * 2
    assert gist.requests() == []


@pytest.mark.parametrize("kind", ["audience", "trait"])
def test_a_change_gist_applied_without_answering_still_fires_its_event_after_a_reconcile(
    workspace: Workspace, engine: Engine, gist: FakeGist, kind: str
) -> None:
    """An entry (an exit, a new trait value) whose answer was lost after Gist applied it
    leaves its user uncertain; the next run would send it again with its event. A reconcile
    in between reads the value in Gist: the change was applied, so it is delivered and its
    event is owed, sent by the next run once, as the run would have sent it."""
    if kind == "audience":
        path = workspace.add_file_audience("VIP", key=VIP, send_track=True)
        entered, exited = "Audience Entered", "Audience Exited"

        def write(members: list[int]) -> None:
            write_members(path, members)
    else:
        path = workspace.root / "score.jsonl"
        workspace.traits.append(
            {"name": "Score", "key": SCORE, "file": path.name, "send_track": True}
        )
        entered = exited = "Trait Computed"

        def write(members: list[int]) -> None:
            path.write_text("".join(
                f'{{"user_id": "u{n}", "email": "u{n}@example.com", "value": {n}}}\n'
                for n in members
            ))  # fmt: skip

    workspace.write_config()
    write([0, 1])
    run_once(workspace.settings(), engine)
    for moved, name in (([0, 1, 2], entered), ([0, 1], exited)):  # u2 enters, then leaves
        write(moved)
        before = len(gist.events())
        gist.drop_after_applying(1)
        workspace.gist_options.update(max_retries=0)
        workspace.write_config()
        [lost] = run_once(workspace.settings(), engine)
        assert lost.status == "failed", lost
        gist.reset_faults()
        workspace.gist_options.update(max_retries=3)
        workspace.write_config()

        reconcile(workspace.settings(), engine)
        gist.clear_log()
        [after] = run_once(workspace.settings(), engine)

        assert (after.status, gist.requests("/contacts")) == ("succeeded", [])
        sent = [(e["user_id"], e["event_name"]) for e in gist.events()[before:]]
        assert sent == [("u2", name)]
        run_once(workspace.settings(), engine)
        assert len(gist.events()) == before + 1


def test_audience_values_neither_true_nor_false_are_said_not_taken_for_members(
    workspace: Workspace, engine: Engine, gist: FakeGist, caplog: pytest.LogCaptureFixture
) -> None:
    """A Gist (or a tool before this one) holding members as "true" or 1: read as not
    members, as a workflow comparing with true would, and said, or the next run would enter
    them all again, events and all, with no word of why."""
    workspace.add_file_audience("VIP", key=VIP, send_track=True)
    gist.add_contact("u0", "u0@example.com", {VIP: True})
    gist.add_contact("u1", "u1@example.com", {VIP: "true"})
    gist.add_contact("u2", "u2@example.com", {VIP: 1})
    gist.add_contact("u3", "u3@example.com", {VIP: False})
    gist.add_contact("u4", "u4@example.com", {VIP: 0})

    [result] = reconcile(workspace.settings(), engine, per_page=2).results

    assert (result.status, result.members) == ("succeeded", 1)
    assert (
        'vip: 3 contacts hold a value that is neither true nor false (first: user u1: "true"), '
        "read as not members: the next run sends them true if the source has them"
    ) in caplog.text


def test_429s_and_5xx_while_paging_are_retried(
    workspace: Workspace, engine: Engine, gist: FakeGist, source: Path
) -> None:
    segment_left(gist)
    gist.fail_next(2, 429, retry_after="0")

    report = reconcile(workspace.settings(), engine, per_page=5)

    assert report.error is None
    gist.fail_next(1, 503)
    assert reconcile(workspace.settings(), engine, per_page=5).error is None
    assert acknowledged(engine, VIP) == users(*range(7))


def test_a_source_that_cannot_be_read_fails_its_key_and_says_so(
    workspace: Workspace, engine: Engine, gist: FakeGist, source: Path
) -> None:
    """A review's find: the source's read error was recorded on the key's result and then
    overwritten, so a reconcile whose source could not be read said "succeeded" with no
    differences at all. Gist's reading is still recorded (it does not come from the
    source); the key fails, saying why."""
    segment_left(gist)
    source.unlink()

    report = reconcile(workspace.settings(), engine)

    [result] = report.results
    assert (result.status, result.failure) == ("failed", "source")
    assert "the source could not be read" in (result.error or "")
    assert "what Gist holds was recorded" in (result.error or "")
    assert acknowledged(engine, VIP) == users(0, 1, 2, 3, 4, 5, 6)


def test_a_wrong_key_fails_at_once_with_a_clear_error(
    workspace: Workspace, engine: Engine, gist: FakeGist, source: Path
) -> None:
    segment_left(gist)
    gist.fail_after(0, 401)

    report = reconcile(workspace.settings(), engine)

    [result] = report.results
    assert result.status == "failed"
    assert "Gist refused the API key" in (result.error or "")
    assert len(gist.requests()) == 1
    assert acknowledged(engine, VIP) == set()


def test_a_key_whose_lease_is_held_is_skipped(
    workspace: Workspace, engine: Engine, gist: FakeGist, source: Path
) -> None:
    from audience_sync import lease

    lease.acquire(engine, VIP, "elsewhere/boot.1:1:live")

    [result] = reconcile(workspace.settings(), engine).results

    assert result.status == "skipped"
    assert gist.requests() == []


@pytest.mark.slow
def test_a_reconcile_killed_half_way_continues_where_it_stopped(
    workspace: Workspace, engine: Engine, gist: FakeGist, source: Path
) -> None:
    for n in range(400):
        gist.add_contact(f"u{n}", f"u{n}@example.com", {VIP: n % 2 == 0})
    gist.latency = 0.01
    process = subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "reconcile", "--per-page", "5",
         "--config", str(workspace.config_path)],
        env={**os.environ, "GIST_API_KEY": API_KEY},
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while len(paging(gist)) < 20:
        assert time.monotonic() < deadline
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()  # type: ignore[union-attr]
    gist.latency = 0
    read_before = paging(gist)

    report = reconcile(workspace.settings(), engine, per_page=5)

    assert report.error is None
    assert (report.pages, report.contacts) == (80, 400)
    counts = Counter(paging(gist))
    assert sorted(counts) == list(range(1, 81))  # page 80 says no page follows
    # Only a page whose save the kill cut short is read twice.
    assert sum(1 for n in counts.values() if n > 1) <= 1
    assert min(paging(gist)[len(read_before) :]) >= len(set(read_before))
    assert acknowledged(engine, VIP) == {f"u{n}" for n in range(0, 400, 2)}


def test_a_reading_stopped_half_way_is_read_again_after_a_run_of_its_keys(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """A review's counterexample: a reconcile stopped by an outage after its first page
    (u1: a member) was continued after a run had sent u1's exit, and made that old page the
    ledger: u1 "a member", Gist holding `false`, so u1's return was never sent. A run that
    plans a key drops the unfinished readings of it; the next reconcile reads Gist anew."""
    path = workspace.add_file_audience("VIP", key=VIP)
    write_members(path, [1, 2, 3, 4])
    run_once(workspace.settings(), engine)
    gist.fail_after(1, 503)  # page 1 (u1, u2) answers, then Gist is down
    first = reconcile(workspace.settings(), engine, per_page=2)
    assert first.error is not None
    assert first.pages == 1
    gist.reset_faults()
    write_members(path, [2, 3, 4])
    run_once(workspace.settings(), engine)  # u1's exit, acknowledged
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(reconciles)) == 0
    gist.clear_log()

    again = reconcile(workspace.settings(), engine, per_page=2)

    assert again.error is None
    assert paging(gist)[0] == 1  # read from the start
    assert acknowledged(engine, VIP) == users(2, 3, 4)
    write_members(path, [1, 2, 3, 4])
    [back] = run_once(workspace.settings(), engine)
    assert back.entered == 1
    assert in_gist(gist, VIP) == users(1, 2, 3, 4)


def test_the_reconcile_command_prints_what_gist_holds_and_what_differs(
    workspace: Workspace, engine: Engine, gist: FakeGist, source: Path, cli: Any
) -> None:
    segment_left(gist)

    code, out, _ = cli("reconcile", "--dry-run")

    assert code == 0
    assert "11 contacts read in 1 page, 2 leads skipped" in out
    assert "dry run: nothing recorded" in out
    code, out, _ = cli("reconcile", VIP, "--json")
    [result] = json.loads(out)
    assert (code, result["kind"], result["members"], result["contacts_read"]) == (
        0, "reconcile", 7, 11,
    )  # fmt: skip
    assert acknowledged(engine, VIP) == users(*range(7))


def test_owed_events_of_a_value_gist_no_longer_holds_are_dropped_the_rest_are_sent(
    workspace: Workspace, engine: Engine, gist: FakeGist, source: Path
) -> None:
    """An event still owed (Gist refused events for a while) announces the change it
    describes; once Gist holds another value for that user (changed behind the tool's back
    and read back by reconcile), it would announce a state Gist left: dropped. Events of
    changes Gist still holds go out."""
    scores = workspace.root / "score.jsonl"
    scores.write_text(
        '{"user_id": "u3", "email": "u3@example.com", "value": 3}\n'
        '{"user_id": "u4", "email": "u4@example.com", "value": 5}\n'
    )
    workspace.traits.append(
        {"name": "Score", "key": SCORE, "file": scores.name, "send_track": True}
    )
    workspace.gist_options["batch_size"] = 100
    workspace.write_config()
    write_members(source, [0, 1, 2])
    gist.fail_after(1, 503)  # the contacts go through (one batch), the events not
    run_once(workspace.settings(), engine)
    gist.reset_faults()
    assert gist.events() == []
    gist.edit_contact("u0", {VIP: False})  # left the audience in Gist
    gist.remove_contact("u1")  # deleted from Gist
    gist.edit_contact("u3", {SCORE: 4})  # another value; u2 and u4 untouched
    write_members(source, [2])  # the source agrees with Gist now
    scores.write_text(
        '{"user_id": "u3", "email": "u3@example.com", "value": 4}\n'
        '{"user_id": "u4", "email": "u4@example.com", "value": 5}\n'
    )

    reconcile(workspace.settings(), engine)
    gist.clear_log()
    run_once(workspace.settings(), engine)

    assert gist.requests("/contacts") == []  # Gist already equals the sources
    sent = Counter((e["user_id"], e["event_name"]) for e in gist.events())
    assert sent == {("u2", "Audience Entered"): 1, ("u4", "Trait Computed"): 1}
    again = run_once(workspace.settings(), engine)
    assert len(gist.events()) == 2, again
