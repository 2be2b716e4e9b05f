"""Batch delivery: ``gist.batch_size > 1`` sends ``POST /contacts/batch``; a 2xx acknowledges
every contact in it, anything else falls back to one request per contact."""

from __future__ import annotations

from sqlalchemy import Engine

from audience_sync.fakegist import FakeGist
from audience_sync.sync import run_once
from tests.conftest import Workspace, write_members
from tests.helpers import acknowledged, in_gist, users


def batch_workspace(workspace: Workspace, members: int) -> None:
    workspace.gist_options["batch_size"] = 5
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(members))


def test_batches_acknowledge_every_contact(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    batch_workspace(workspace, 12)

    [run] = run_once(workspace.settings(), engine)

    assert (run.status, run.delivered) == ("succeeded", 12)
    batches = gist.requests("/contacts/batch")
    assert sorted(len(r.body["contacts"]) for r in batches) == [2, 5, 5]  # sent concurrently
    assert gist.requests("/contacts") == []
    assert acknowledged(engine) == in_gist(gist) == users(*range(12))


def test_a_refused_batch_falls_back_to_single_requests(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    batch_workspace(workspace, 10)
    gist.fail_user("u3", 422, "Email is invalid")

    [run] = run_once(workspace.settings(), engine)

    assert (run.status, run.delivered, run.failed) == ("partial", 9, 1)
    assert sorted(r.status for r in gist.requests("/contacts/batch")) == [200, 422]
    assert len(gist.requests("/contacts")) == 5  # the refused batch, one by one
    assert acknowledged(engine) == in_gist(gist) == users(0, 1, 2, 4, 5, 6, 7, 8, 9)


def test_a_refused_key_stops_batches_too(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    batch_workspace(workspace, 10)
    gist.fail_after(0, 401, message="Invalid API key")

    [run] = run_once(workspace.settings(), engine)

    assert run.status == "failed"
    assert "API key" in (run.error or "")
    assert acknowledged(engine) == set()
