"""How a run's status and failure kind are settled (``runs.finish_run``, ``failure_kind``):
what a scheduler reads to decide between a retry and a person."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

import audience_sync
from audience_sync import errors
from audience_sync.fakegist import FakeGist
from audience_sync.runs import RunResult, failure_kind
from tests.conftest import Workspace, write_members

WRONG = {"GIST_API_KEY": "wrong-key"}


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
