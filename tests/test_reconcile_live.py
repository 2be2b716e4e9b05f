"""A reconcile beside runs of other keys (a daemon syncing them while it reads), and an
entry a killed run sent: found by a review of this stop's reconcile changes."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from audience_sync import reconcile as reconcile_module
from audience_sync.fakegist import FakeGist
from audience_sync.models import memberships
from audience_sync.reconcile import reconcile
from audience_sync.sync import run_once
from tests.conftest import Workspace, write_members
from tests.test_exactness import Halt, add_audience, sync

VIP = "vip"
OTHER = "other"


class _RunBeforePage(httpx.AsyncBaseTransport):
    """Forwards to the fake Gist; before answering page ``page`` of the contacts it lets
    ``between`` run to its end (another process's run of another key, say)."""

    def __init__(self, page: int, between: Any) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.page, self.between, self.done = str(page), between, False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        is_page = request.method == "GET" and request.url.path.rstrip("/") == "/contacts"
        if is_page and request.url.params.get("page") == self.page and not self.done:
            self.done = True
            thread = threading.Thread(target=self.between)  # run_once has its own loop
            thread.start()
            thread.join()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _vip_and_other(workspace: Workspace, engine: Engine) -> Any:
    vip = workspace.add_file_audience("VIP", key=VIP, send_track=True)
    other = workspace.add_file_audience("Other", key=OTHER)
    write_members(vip, [1, 2])
    write_members(other, [3])
    run_once(workspace.settings(), engine)
    return other


def test_a_run_of_another_key_between_a_reconciles_pages_does_not_break_it(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """`reconcile vip` (holding vip's lease) reads page 1; meanwhile the daemon runs
    `other` (its own lease, no overlap with vip). A start_plan that dropped *every*
    unfinished reading dropped vip's, being read right now: the reconcile's next page was
    saved under a reading that no longer existed (foreign key), and it crashed. A reconcile
    of one key (17 min per 1M contacts) could not finish while any other key was synced."""
    other = _vip_and_other(workspace, engine)
    write_members(other, [3, 4])  # the daemon's next run of `other` has something to send

    def run_other() -> None:
        [result] = run_once(workspace.settings(), engine, [OTHER])
        assert result.status == "succeeded"

    report = reconcile(
        workspace.settings(), engine, [VIP], per_page=1, transport=_RunBeforePage(2, run_other)
    )

    assert report.error is None


def test_a_run_of_another_key_while_a_reconcile_compares_does_not_wipe_its_ledger(
    workspace: Workspace, engine: Engine, gist: FakeGist, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same race, later: every page of vip's reading is saved, the reconcile is staging
    the source to compare (minutes for a large warehouse query) when `other`'s run plans.
    Had it dropped the reading, `_record` would make an empty reading vip's ledger: the
    reconcile saying `succeeded`, vip's memberships gone though Gist holds u1 and u2 true,
    and the next run entering both again, `Audience Entered` a second time for each."""
    other = _vip_and_other(workspace, engine)
    write_members(other, [3, 4])
    compare = reconcile_module._compare
    ran: list[bool] = []

    def compare_after_another_run(*args: Any, **kwargs: Any) -> Any:
        if not ran:
            ran.append(True)
            [result] = run_once(workspace.settings(), engine, [OTHER])
            assert result.status == "succeeded"
        return compare(*args, **kwargs)

    monkeypatch.setattr(reconcile_module, "_compare", compare_after_another_run)
    events_before = len(gist.events())

    report = reconcile(workspace.settings(), engine, [VIP])
    monkeypatch.undo()

    assert report.error is None
    with engine.connect() as connection:
        ledger = set(
            connection.scalars(
                select(memberships.c.user_id).where(memberships.c.audience_key == VIP)
            )
        )
    [run, _] = run_once(workspace.settings(), engine)
    assert (run.entered, len(gist.events()) - events_before, ledger) == (0, 0, {"u1", "u2"})


def test_an_entry_applied_by_a_killed_run_owes_its_event_though_a_later_try_was_refused(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """The fix of _settle_applied, with the answer lost by a kill instead of a timeout (its
    docstring names both): u2's entry is applied by Gist, then the run is killed before
    saving (the change stays `pending`, u2 uncertain). u2 leaves; the next run supersedes
    the killed run's pending change and sends an exit, refused (422). A reconcile finds u2
    `true`; were the settled candidates only `failed`/`pending` changes, the applied entry,
    `superseded`, would be missed: the reading would make u2 a member with no event owed,
    and the next run's exit announce `Audience Exited` for an entry never announced."""

    class Kill:
        def loaded(self, audience_key: str, rows: int) -> None: ...
        def planned(self, changes: int) -> None: ...
        def sent(self, changes: int) -> None:
            raise Halt

    vip = add_audience(workspace, VIP, send_track=True)
    workspace.gist_options.update(batch_size=1, max_concurrency=1, max_retries=0)
    workspace.write_config()
    write_members(vip, [1])
    sync(workspace, engine)
    write_members(vip, [1, 2])
    with pytest.raises(Halt):
        sync(workspace, engine, progress=Kill())
    assert gist.properties(VIP) == {"u1": True, "u2": True}  # applied, never saved
    write_members(vip, [1])
    gist.fail_user("u2", 422, "Contact is locked")
    [refused] = sync(workspace, engine)
    assert refused.failed == 1
    gist.reset_faults()
    before = len(gist.events())

    assert reconcile(workspace.settings(), engine).error is None
    sync(workspace, engine)

    assert gist.properties(VIP) == {"u1": True, "u2": False}
    sent = [(e["user_id"], e["event_name"]) for e in gist.events()[before:]]
    assert sent in ([("u2", "Audience Entered"), ("u2", "Audience Exited")], [])
