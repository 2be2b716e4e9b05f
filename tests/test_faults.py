"""The fault suite: for every fault Gist or the state database can throw at a run, the run
after it (fault gone) leaves Gist equal to the source and ``memberships`` equal to Gist."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text

from audience_sync.fakegist import FakeGist
from audience_sync.models import member_changes, sync_runs, uncertain_members
from audience_sync.sync import RunResult, run_once
from tests.conftest import Workspace, require_postgres, write_members
from tests.helpers import KEY, acknowledged, free_port, in_gist, users

BEFORE = range(30)  # acknowledged before the fault
AFTER = [*range(10, 40)]  # u0-u9 leave, u30-u39 join: 20 changes


def http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


def gist_down(gist: FakeGist, workspace: Workspace) -> None:
    # Nothing listens on this port: every connection is refused.
    workspace.gist_url = f"http://127.0.0.1:{free_port()}"
    workspace.write_config()


def too_slow(gist: FakeGist, workspace: Workspace) -> None:
    workspace.gist_options["timeout_seconds"] = 0.2
    workspace.write_config()
    gist.latency = 0.4


def trickling(gist: FakeGist, workspace: Workspace) -> None:
    workspace.gist_options["timeout_seconds"] = 0.5
    workspace.write_config()
    gist.trickle_next(5, every=0.2)  # each would take 200 s to arrive whole


FAULTS: dict[str, Callable[[FakeGist, Workspace], None]] = {
    "429-retry-after-seconds": lambda g, w: g.fail_next(4, 429, retry_after="1"),
    "429-retry-after-http-date": lambda g, w: g.fail_next(3, 429, retry_after=http_date(1.5)),
    "429-from-gist-rate-limit": lambda g, w: setattr(g, "rate_limit", 5),
    "5xx-burst": lambda g, w: g.fail_next(6, 503),
    "5xx-half-way-for-good": lambda g, w: g.fail_after(8, 500),
    "slow-answers-past-timeout": too_slow,
    "answers-trickling-past-timeout": trickling,
    "dropped-connections": lambda g, w: g.drop_next(6),
    "gist-down-whole-run": gist_down,
    "401-half-way": lambda g, w: g.fail_after(8, 401, message="Invalid API key"),
    "403-half-way": lambda g, w: g.fail_after(8, 403, message="Forbidden"),
    "422-for-one-member": lambda g, w: g.fail_user("u35", 422, "Email is invalid"),
}


@pytest.mark.parametrize("fault", list(FAULTS.values()), ids=list(FAULTS))
def test_fault_then_clean_run_converges(
    workspace: Workspace, engine: Engine, gist: FakeGist, fault: Callable[..., None]
) -> None:
    workspace.gist_options.update(max_retries=2, timeout_seconds=5, max_concurrency=4)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, BEFORE)
    run_once(workspace.settings(), engine)
    good_url = workspace.gist_url

    write_members(source, AFTER)
    fault(gist, workspace)
    [faulty] = run_once(workspace.settings(), engine)

    if fault is not too_slow:
        # memberships holds only what Gist acknowledged, and wherever Gist differs from it
        # the member is uncertain, so the next run sends it again: a request in flight when the
        # key was refused is cancelled, and Gist may have applied it. (A timed-out request
        # may still be applied by Gist later, unacknowledged, likewise.)
        with engine.connect() as connection:
            unsure = set(connection.scalars(select(uncertain_members.c.user_id)))
        assert acknowledged(engine) ^ in_gist(gist) <= unsure
    if fault is too_slow:
        time.sleep(0.5)  # let the fake finish answering the requests the client gave up on
    gist.reset_faults()
    workspace.gist_url = good_url
    workspace.gist_options["timeout_seconds"] = 5
    workspace.write_config()
    [clean] = run_once(workspace.settings(), engine)

    assert clean.status == "succeeded", (faulty, clean)
    assert in_gist(gist) == acknowledged(engine) == users(*AFTER)
    assert {u: v for u, v in gist.properties(KEY).items() if v is False} == dict.fromkeys(
        users(*range(10)), False
    )
    gist.clear_log()
    [idle] = run_once(workspace.settings(), engine)
    assert (idle.entered, idle.exited, gist.requests()) == (0, 0, [])


def test_a_trickling_answer_ends_at_the_deadline_and_is_retried(
    workspace: Workspace, engine: Engine, gist: FakeGist, caplog: pytest.LogCaptureFixture
) -> None:
    """`Content-Length: 1000`, then a byte a second: httpx's timeouts bound each read, so
    one request lived ~1000 s with `timeout_seconds = 5`. The timeout is a deadline."""
    caplog.set_level(logging.INFO, "audience_sync.pacer")
    workspace.gist_options.update(timeout_seconds=2, max_retries=1, max_concurrency=1)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(3))
    gist.trickle_next(1, every=1.0)

    began = time.monotonic()
    [run] = run_once(workspace.settings(), engine)
    took = time.monotonic() - began

    assert run.status == "succeeded", run
    assert took < 2 + 3, f"the run took {took:.1f}s"  # the deadline, then the retry
    assert in_gist(gist) == acknowledged(engine) == users(0, 1, 2)
    [retry] = [r.getMessage() for r in caplog.records if r.name == "audience_sync.pacer"]
    assert "on attempt 1/2 (Gist at " in retry
    assert "timed out: no whole answer within 2 s); retrying in " in retry

    write_members(source, range(4))
    workspace.gist_options["max_retries"] = 0
    workspace.write_config()
    gist.trickle_next(1, every=1.0)
    [run] = run_once(workspace.settings(), engine)
    assert (run.status, run.failed) == ("failed", 1)  # its one change timed out
    with engine.connect() as connection:
        error = connection.scalar(
            select(member_changes.c.last_error).where(member_changes.c.run_id == run.run_id)
        )
    assert "timed out: no whole answer within 2 s" in str(error)


REDIRECTS = [301, 302, 304, 307]


@pytest.mark.parametrize("batch_size", [1, 10], ids=["single", "batch"])
@pytest.mark.parametrize("status", REDIRECTS, ids=[str(s) for s in REDIRECTS])
def test_a_3xx_answer_acknowledges_nothing(
    workspace: Workspace, engine: Engine, gist: FakeGist, status: int, batch_size: int
) -> None:
    # Only a 2xx says Gist applied a request: a redirect (a proxy, a moved API) applied
    # nothing, so nothing is recorded and the next run sends it all again.
    workspace.gist_options.update(batch_size=batch_size, max_retries=1)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(5))
    gist.redirect_next(1000, status)

    [redirected] = run_once(workspace.settings(), engine)

    path = "/contacts/batch" if batch_size > 1 else "/contacts"
    assert gist.requests(path), "the case was not exercised"
    assert {r.status for r in gist.requests()} == {status}
    assert redirected.delivered == 0
    assert acknowledged(engine) == set() == in_gist(gist)
    with engine.connect() as connection:
        outcomes = set(
            connection.execute(select(member_changes.c.status, member_changes.c.http_status))
        )
    assert outcomes <= {("failed", status), ("pending", None)}
    gist.reset_faults()
    [after] = run_once(workspace.settings(), engine)
    assert (after.status, after.delivered) == ("succeeded", 5)
    assert in_gist(gist) == acknowledged(engine) == users(*range(5))


def test_client_waits_as_told_and_never_exceeds_its_rate(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    workspace.gist_options.update(requests_per_second=10, max_concurrency=8)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(25))
    gist.fail_next(3, 429, retry_after="1")

    [run] = run_once(workspace.settings(), engine)

    assert run.status == "succeeded"
    requests = gist.requests("/contacts")
    # The rate itself is proven to the millisecond in simulated time (tests/test_delivery.py);
    # here: the waits Gist asked for were kept, over real HTTP.
    by_user: dict[str, list[Any]] = defaultdict(list)
    for r in requests:
        by_user[r.body["user_id"]].append(r)
    retried = [rs for rs in by_user.values() if rs[0].status == 429]
    assert len(retried) == 3
    for first, second in (rs[:2] for rs in retried):
        assert second.at - first.at >= 0.95


def run_in_thread(workspace: Workspace, engine: Engine) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["results"] = run_once(workspace.settings(), engine)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def wait_for_requests(gist: FakeGist, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(gist.requests()) < count:
        assert time.monotonic() < deadline, "delivery never got going"
        time.sleep(0.01)


def test_state_db_unavailable_mid_run(
    workspace: Workspace, engine: Engine, gist: FakeGist, state_url: str
) -> None:
    workspace.gist_options.update(max_concurrency=2)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(80))
    gist.latency = 0.02

    thread, outcome = run_in_thread(workspace, engine)
    wait_for_requests(gist, 10)
    if state_url.startswith("sqlite"):
        # Another process locks the whole file for two seconds.
        path = state_url.removeprefix("sqlite:///")
        blocker = sqlite3.connect(path, timeout=10)
        blocker.execute("BEGIN EXCLUSIVE")
        time.sleep(2)
        blocker.rollback()
        blocker.close()
    else:
        # Every connection of this sync is killed, as in a PostgreSQL restart.
        admin = create_engine(require_postgres())
        name = state_url.rsplit("application_name=", 1)[1]
        killed = 0
        for _ in range(5):
            with admin.connect() as connection:
                killed += connection.scalar(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = :name"
                    ),
                    {"name": name},
                )
            time.sleep(0.1)
        admin.dispose()
        assert killed > 0
    thread.join(30)
    assert not thread.is_alive()

    # It either rode the outage out or failed; either way nothing acknowledged was lost...
    assert acknowledged(engine) <= in_gist(gist)
    gist.latency = 0
    [clean] = run_once(workspace.settings(), engine)
    # ...and the next run completes the job and leaves no run marked running.
    assert clean.status == "succeeded"
    assert in_gist(gist) == acknowledged(engine) == users(*range(80))
    with engine.connect() as connection:
        running = connection.scalar(select(func.count()).where(sync_runs.c.status == "running"))
    assert running == 0
    first: list[RunResult] | None = outcome.get("results")
    assert first is not None or isinstance(outcome.get("error"), Exception)
