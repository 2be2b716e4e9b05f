"""How a run's status and failure kind are settled (``runs.finish_run``, ``failure_kind``):
what a scheduler reads to decide between a retry and a person."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError

import audience_sync
from audience_sync import errors
from audience_sync.fakegist import FakeGist
from audience_sync.models import sync_runs
from audience_sync.runs import RunResult, failure_kind
from audience_sync.sync import run_once
from tests.conftest import Workspace, write_members

WRONG = {"GIST_API_KEY": "wrong-key"}


def stored_status(engine: Engine, run_id: int | None) -> str:
    with engine.connect() as connection:
        return str(connection.scalar(select(sync_runs.c.status).where(sync_runs.c.id == run_id)))


@pytest.mark.parametrize("full_diff", [False, True], ids=["fast-path", "full-diff"])
def test_a_run_that_owes_nothing_succeeds_while_gist_refuses_the_key(
    workspace: Workspace, engine: Engine, gist: FakeGist, full_diff: bool
) -> None:
    """The rule: a run that planned nothing and owes no event never asked Gist anything,
    so it succeeded whatever the key, on the fast path and after a full diff alike (it
    was ``failed`` after a full diff when another audience met the refused key)."""
    owes = workspace.add_file_audience("Owes")
    write_members(owes, range(2))
    write_members(workspace.add_file_audience("Settled"), range(3))
    audience_sync.run(workspace.config_path, environ=workspace.env)
    workspace.env = WRONG
    audience_sync.run(workspace.config_path, environ=WRONG)  # the key's runs: nothing owed
    write_members(owes, range(3))  # now "owes" has a change to send

    results = run_once(workspace.settings(), engine, full_diff=full_diff)

    by_key = {r.audience_key: r for r in results}
    assert (by_key["owes"].status, by_key["owes"].failure) == ("failed", "auth")
    settled = by_key["settled"]
    assert (settled.status, settled.failure, settled.error) == ("succeeded", None, None)
    assert settled.fast_path is not full_diff
    assert stored_status(engine, settled.run_id) == "succeeded"
    assert audience_sync.exit_code(results) == 1  # "owes" still fails the invocation


def test_a_run_that_owes_events_fails_while_gist_refuses_the_key(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """Planning nothing is not owing nothing: events still owed from an earlier run are
    owed to Gist, and the refused key keeps them from going out."""
    owes = workspace.add_file_audience("Owes")
    write_members(owes, range(2))
    write_members(workspace.add_file_audience("Tracked", send_track=True), range(3))
    gist.fail_after(5, 503)  # the five contacts go through; the events do not
    first = audience_sync.run(workspace.config_path, environ=workspace.env)
    # Delivery stopped for the invocation: "owes" had sent its changes, so it failed too.
    assert [(r.status, r.failure) for r in first] == [("failed", "unavailable")] * 2
    gist.reset_faults()
    write_members(owes, range(3))

    results = audience_sync.run(workspace.config_path, environ=WRONG)

    tracked = results[1]
    assert (tracked.entered, tracked.exited) == (0, 0)
    assert (tracked.status, tracked.failure) == ("failed", "auth")
    assert "Gist refused the API key" in (tracked.error or "")


def scenario(name: str, workspace: Workspace, gist: FakeGist) -> dict[str, Any]:
    """Set up one way for the audience "VIP" (3 members, then 1) to fail; returns the
    arguments of the run that meets it."""
    source = workspace.add_file_audience("VIP", mass_exit_min_members=0)
    write_members(source, range(3))
    kwargs: dict[str, Any] = {"environ": workspace.env}
    if name == "auth":
        kwargs["environ"] = WRONG
    elif name == "unavailable":
        gist.fail_after(0, 503)
    elif name == "refused":
        gist.fail_user("u1", 422, "Email is invalid")
    elif name == "source":
        source.write_text('{"user_id": "u1"}\n')  # no email: every row rejected
    elif name == "guarded":
        audience_sync.run(workspace.config_path, environ=workspace.env)
        write_members(source, range(1))
    elif name == "interrupted":
        stop = threading.Event()
        stop.set()
        kwargs["stop"] = stop
    return kwargs


@pytest.mark.parametrize(
    ("name", "status", "retriable"),
    [
        ("auth", "failed", False),
        ("unavailable", "failed", True),
        ("refused", "partial", False),
        ("source", "failed", False),
        ("guarded", "guarded", False),
        ("interrupted", "interrupted", True),
    ],
    ids=lambda value: str(value),
)
def test_each_failing_result_says_its_kind_and_whether_a_retry_mends_it(
    workspace: Workspace,
    engine: Engine,
    gist: FakeGist,
    name: str,
    status: str,
    retriable: bool,
) -> None:
    kwargs = scenario(name, workspace, gist)

    [result] = audience_sync.run(workspace.config_path, **kwargs)

    assert (result.status, result.failure) == (status, name)
    assert audience_sync.is_retriable(result.failure) is retriable


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (errors.ConfigError("bad"), "config"),
        (errors.StateError("down"), "state"),
        (OperationalError("SELECT 1", {}, Exception("gone")), "state"),
        (errors.SourceError("no such table"), "source"),
        (errors.AuthError("401", status=401), "auth"),
        (errors.UnreachableError("TLS"), "config"),
        (errors.RetriableApiError("503", status=503), "unavailable"),
        (errors.FatalApiError("422", status=422), "refused"),
        (errors.StopRequestedError("SIGTERM"), "interrupted"),
        (KeyboardInterrupt(), "interrupted"),
        (ValueError("a bug"), "internal"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_an_exception_names_its_failure_kind(exc: BaseException, kind: str) -> None:
    assert failure_kind(exc) == kind
    assert audience_sync.failure_kind(exc) == kind


def test_the_retriable_kinds_are_those_a_retry_can_mend() -> None:
    assert set(errors.FAILURE_KINDS) >= errors.RETRIABLE_FAILURES
    assert {k for k in errors.FAILURE_KINDS if audience_sync.is_retriable(k)} == {
        "unavailable",
        "state",
        "interrupted",
    }
    assert RunResult("k", "K", "run", "succeeded").failure is None
