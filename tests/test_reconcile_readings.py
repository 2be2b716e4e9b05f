"""A reconcile reading stopped half-way and continued after something else wrote (a run
of another key, ``verify --repair``), and the changes a reading finds applied: found by a
review of reconcile, each failing before its fix."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, select

from audience_sync.fakegist import FakeGist
from audience_sync.models import contacts
from audience_sync.reconcile import reconcile
from audience_sync.sync import run_once
from tests.conftest import Workspace, write_members

VIP = "vip"
OTHER = "other"


def _two_audiences(workspace: Workspace) -> tuple[Path, Path]:
    vip = workspace.add_file_audience("VIP", key=VIP, send_track=True)
    other = workspace.add_file_audience("Other", key=OTHER, send_track=True)
    return vip, other


def _resumed_after_another_key_ran(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> tuple[Path, Path]:
    """A reconcile of VIP stops after its first page (u1, email old). A run of OTHER, a key
    the reading does not cover (so it does not drop it), moves u1's email in Gist to the
    sources' new one. The reconcile is continued to its end. Returns the two sources."""
    vip, other = _two_audiences(workspace)
    old, new = ("u1", "u1@example.com"), ("u1", "u1.new@example.com")
    gist.add_contact("u1", "u1@example.com")  # page 1 is u1's, page 2 u2's
    gist.add_contact("u2", "u2@example.com")
    write_members(vip, [old, 2])
    write_members(other, [old, 2])
    run_once(workspace.settings(), engine)

    gist.fail_after(1, 503)  # page 1 (u1) answers, then Gist is down
    first = reconcile(workspace.settings(), engine, [VIP], per_page=1)
    assert first.error is not None
    assert first.pages == 1
    gist.reset_faults()

    write_members(vip, [new, 2])
    write_members(other, [new, 2])
    [o] = run_once(workspace.settings(), engine, [OTHER])
    assert o.status == "succeeded"
    assert gist.contacts()["u1"]["email"] == "u1.new@example.com"
    assert reconcile(workspace.settings(), engine, [VIP], per_page=1).error is None
    return vip, other


def test_a_resumed_reading_does_not_record_an_email_a_run_of_another_key_changed_since(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """Page 1's stale email became the ledger's and the contact's: Gist held the new email,
    the state said the old one. The email acknowledged since the reading started is kept."""
    _resumed_after_another_key_ran(workspace, engine, gist)

    with engine.connect() as connection:
        contact_email = connection.scalar(
            select(contacts.c.email).where(contacts.c.user_id == "u1")
        )
    assert contact_email == gist.contacts()["u1"]["email"] == "u1.new@example.com"


def test_after_a_resumed_reading_the_next_run_resends_nothing_gist_holds(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """The next run of both keys, sources unchanged, re-sent u1 (vip true, the new email)
    though Gist held exactly that already."""
    _resumed_after_another_key_ran(workspace, engine, gist)
    gist.clear_log()

    run_once(workspace.settings(), engine)

    assert [r.body for r in gist.requests("/contacts")] == []


def test_after_a_resumed_reading_an_exit_carries_a_stale_email_into_gist(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """Then u1 leaves both sources: its exits carry the last acknowledged email as
    ``contacts`` has it, which the resumed reading had set back to the old one: Gist's
    contact email, the sources' last (new), was overwritten with the old one."""
    vip, other = _resumed_after_another_key_ran(workspace, engine, gist)
    write_members(vip, [2])
    write_members(other, [2])

    results = run_once(workspace.settings(), engine)

    assert all(r.status == "succeeded" for r in results), results
    assert gist.contacts()["u1"]["custom_properties"] == {VIP: False, OTHER: False}
    assert gist.contacts()["u1"]["email"] == "u1.new@example.com"


def test_a_resumed_reading_does_not_erase_drift_verify_repair_found_since(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """A reconcile of VIP stops after page 1 (u1: true). Later u1's property is flipped in
    Gist, and ``verify --repair`` (holding VIP's lease) finds it and marks u1 uncertain, so
    the next run re-sends it. The reconcile is continued instead: page 1, read before the
    repair, becomes the ledger (u1 a member) and the repair's uncertainty is wiped. The
    next run sends nothing for u1; Gist keeps `false` for a member of the source."""
    from audience_sync.verify import verify_audience

    gist.add_contact("u1", "u1@example.com")
    gist.add_contact("u2", "u2@example.com")
    vip = workspace.add_file_audience("VIP", key=VIP)
    write_members(vip, [1, 2])
    run_once(workspace.settings(), engine)
    gist.fail_after(1, 503)
    assert reconcile(workspace.settings(), engine, [VIP], per_page=1).pages == 1
    gist.reset_faults()
    gist.edit_contact("u1", {VIP: False})
    report = verify_audience(workspace.settings(), engine, VIP, repair=True)
    assert report.repaired == 1

    assert reconcile(workspace.settings(), engine, [VIP], per_page=1).error is None
    [result] = run_once(workspace.settings(), engine)

    assert result.status == "succeeded"
    assert gist.properties(VIP) == {"u1": True, "u2": True}


def test_an_entry_gist_applied_unanswered_owes_its_event_though_a_later_try_was_refused(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """u2 enters; Gist applies the entry but its answer is lost (u2 uncertain). u2 leaves
    the source; the exit is refused (422: not applied; u2 stays uncertain). A reconcile reads
    u2 `true`: the entry was applied. But only the user's latest change (the refused exit)
    is checked against the reading, so the entry's `Audience Entered` is never owed, while
    the next run's exit fires `Audience Exited`: Gist's workflows see u2 leave an audience
    it was never announced entering."""
    gist.add_contact("u1", "u1@example.com")
    vip = workspace.add_file_audience("VIP", key=VIP, send_track=True)
    write_members(vip, [1])
    run_once(workspace.settings(), engine)
    workspace.gist_options.update(max_retries=0)
    workspace.write_config()
    write_members(vip, [1, 2])
    gist.drop_after_applying(1)
    [lost] = run_once(workspace.settings(), engine)
    assert lost.status == "failed"
    gist.reset_faults()
    write_members(vip, [1])
    gist.fail_user("u2", 422, "Contact is locked")
    [refused] = run_once(workspace.settings(), engine)
    assert refused.failed == 1
    gist.reset_faults()
    workspace.gist_options.update(max_retries=3)
    workspace.write_config()
    assert gist.properties(VIP) == {"u1": True, "u2": True}
    before = len(gist.events())

    assert reconcile(workspace.settings(), engine).error is None
    run_once(workspace.settings(), engine)

    assert gist.properties(VIP) == {"u1": True, "u2": False}
    sent = [(e["user_id"], e["event_name"]) for e in gist.events()[before:]]
    # Either both (the applied entry's event is owed, then the exit's) or neither (as
    # without the reconcile), never an exit announced alone.
    assert sent in ([("u2", "Audience Entered"), ("u2", "Audience Exited")], [])
