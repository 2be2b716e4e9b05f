"""Leases and the sender's fence: a holder paused past its lease sends nothing once it wakes,
the run that lost its lease ends ``interrupted``, and the fence's bound holds to the second."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import OperationalError

from audience_sync import lease, sync
from audience_sync.errors import FencedError, LockHeldError
from audience_sync.fakegist import FakeGist
from audience_sync.models import leases, sync_runs
from audience_sync.sync import run_once
from audience_sync.workers import Presence
from tests.conftest import API_KEY, Workspace, write_members
from tests.helpers import KEY, acknowledged, in_gist, users


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.01)


class FakeMonotonic:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.slow
def test_a_paused_holder_sends_nothing_after_its_lease_was_taken_over(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """The reproduction: a ``run`` stopped (SIGSTOP) mid-delivery with requests queued in its
    pacer, past its lease; another run takes over and sends the newer source (ten members
    left); the first wakes up. Without the fence it sent its queued ``true``s after the
    taker's ``false``s, and Gist kept them for good."""
    workspace.state_options.update(lease_seconds=3)
    workspace.gist_options.update(requests_per_second=20, max_concurrency=8, timeout_seconds=1)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(60))
    paused = subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "run", "--config", str(workspace.config_path)],
        env={**os.environ, "GIST_API_KEY": API_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: len(gist.requests("/contacts")) >= 10)
        paused.send_signal(signal.SIGSTOP)
        write_members(source, range(50))  # u50..u59 leave: still queued in the paused one
        time.sleep(3.5)  # past the lease, on every clock

        [taker] = run_once(workspace.settings(), engine)
        assert taker.status == "succeeded", taker
        assert in_gist(gist) == users(*range(50))
        woke = time.monotonic()
        paused.send_signal(signal.SIGCONT)
        out, err = paused.communicate(timeout=60)
    finally:
        paused.kill()
        paused.wait()

    late = [r for r in gist.requests("/contacts") if r.at >= woke]
    assert late == [], f"{len(late)} requests left after the lease was lost"
    assert in_gist(gist) == users(*range(50))
    assert acknowledged(engine) == users(*range(50))
    # The run that lost its lease says so: interrupted, who took it, exit 1.
    assert paused.returncode == 1, out + err
    with engine.connect() as connection:
        first = connection.execute(select(sync_runs).order_by(sync_runs.c.id).limit(1)).one()
    assert first.status == "interrupted"
    assert f"{KEY}: lease taken over by " in (first.error or "")
    assert "interrupted" in out + err
    # Nothing is owed afterwards: a further run sends nothing.
    gist.clear_log()
    [again] = run_once(workspace.settings(), engine)
    assert (again.status, gist.requests()) == ("succeeded", [])


def test_the_fence_opens_only_while_the_lease_outlasts_the_request(engine: Engine) -> None:
    """A request may leave while (time since the last confirmed renewal) + its deadline is
    under the lease length: up to 60 - 10 s after a renewal here, never at or after."""
    clock = FakeMonotonic()
    holder = lease.Holder(engine, "me:1:a", seconds=60, request_seconds=10, monotonic=clock)
    holder.acquire("vip")
    clock.now += 49.9
    holder.check(["vip"])
    clock.now += 0.1
    with pytest.raises(FencedError, match=r"last confirmed 50\.0 s ago"):
        holder.check(["vip"])
    # A renewal counts from just before it was sent, once committed.
    with holder.fenced(["vip"]) as (_, held):
        assert held == {"vip"}
        clock.now += 5  # the transaction took 5 s: the lease runs from its statement
    clock.now += 44.9
    holder.check(["vip"])
    clock.now += 0.1
    with pytest.raises(FencedError):
        holder.check(["vip"])
    with pytest.raises(FencedError, match="no lease held"):
        holder.check(["other"])


def test_a_renewal_that_did_not_commit_does_not_open_the_fence(engine: Engine) -> None:
    clock = FakeMonotonic()
    holder = lease.Holder(engine, "me:1:a", seconds=10, request_seconds=2, monotonic=clock)
    holder.acquire("vip")
    clock.now += 7
    with pytest.raises(RuntimeError), holder.fenced(["vip"]):
        raise RuntimeError("the save failed")
    clock.now += 1
    with pytest.raises(FencedError):
        holder.check(["vip"])


def test_a_lost_lease_stays_lost_and_says_who_took_it(engine: Engine) -> None:
    holder = lease.Holder(engine, "me:1:a", seconds=60, request_seconds=1)
    holder.acquire("vip")
    with engine.begin() as connection:
        connection.execute(update(leases).values(owner="thief/boot.1:1:x"))
    with holder.fenced(["vip"]) as (_, held):
        assert held == set()
    assert holder.loss() == {"vip": "vip: lease taken over by thief/boot.1:1:x"}
    assert holder.lost.is_set()
    with pytest.raises(FencedError, match="lease taken over by thief"):
        holder.check(["vip"])
    # Given back to us by hand, it is still not ours to use: the loss is for good.
    with engine.begin() as connection:
        connection.execute(update(leases).values(owner="me:1:a"))
    with holder.fenced(["vip"]):
        pass
    with pytest.raises(FencedError):
        holder.check(["vip"])


def test_an_expired_unrenewed_lease_is_lost_though_no_one_took_it(engine: Engine) -> None:
    holder = lease.Holder(engine, "me:1:a", seconds=2, request_seconds=0.5)
    holder.acquire("vip")
    time.sleep(2.2)
    with holder.fenced(["vip"]) as (_, held):
        assert held == set()
    assert holder.loss() == {"vip": "vip: lease expired before it was renewed"}


def test_a_taker_waits_the_full_lease_on_the_database_clock(engine: Engine) -> None:
    lease.acquire(engine, "vip", "elsewhere/boot.1:1:live", seconds=2)
    with pytest.raises(LockHeldError):
        lease.acquire(engine, "vip", "me:1:a", seconds=2)
    time.sleep(2.2)
    assert lease.acquire(engine, "vip", "me:1:a", seconds=2) == "elsewhere/boot.1:1:live"


def test_a_request_deadline_longer_than_half_the_lease_is_a_config_error(
    workspace: Workspace,
) -> None:
    workspace.state_options.update(lease_seconds=60)
    workspace.gist_options.update(timeout_seconds=31)
    workspace.add_file_audience("Vip")
    from audience_sync.errors import ConfigError

    with pytest.raises(ConfigError, match=r"gist.timeout_seconds \(31\) must be at most half"):
        workspace.settings()


def test_two_holders_of_one_owner_in_one_process_exclude_each_other(engine: Engine) -> None:
    first, second = (lease.Holder(engine, "me:1:a") for _ in range(2))
    first.acquire("vip")
    with pytest.raises(LockHeldError, match="'vip' is being synced by me:1:a"):
        second.acquire("vip")
    second.acquire("other")  # a key of its own is free
    first.release()
    assert second.acquire("vip") is None
    second.release()


def test_a_lease_whose_release_went_unrecorded_is_its_workers_again_at_once(
    workspace: Workspace, engine: Engine, gist: FakeGist, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a daemon whose state database went down as a run ended skipped its own
    audience ("being synced by" itself) until the lease expired, a minute later."""
    source = workspace.add_file_audience("Vip")
    write_members(source, range(2))
    settings = workspace.settings()
    down = OperationalError("UPDATE leases", {}, OSError("the state database went away"))
    with Presence(engine, "daemon") as worker:
        with mock.patch.object(lease, "release", side_effect=down):
            [first] = run_once(settings, engine, worker=worker)
        assert first.status == "succeeded"  # its work is saved: the release is not the run's
        assert "could not release the leases of vip: " in caplog.text
        assert "the state database went away" in caplog.text
        write_members(source, range(3))
        [elsewhere] = run_once(settings, engine)  # another worker waits for the lease to expire
        assert elsewhere.status == "skipped", elsewhere
        [again] = run_once(settings, engine, worker=worker)
    assert (again.status, again.entered) == ("succeeded", 1), again
    assert acknowledged(engine, "vip") == users(0, 1, 2)


def test_an_unknown_boot_id_never_makes_another_machines_live_owner_dead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two machines with one host name (both in the initial pid namespace, whose inode is
    the same constant on every Linux kernel) where the boot id cannot be read: an owner of
    the *other* machine names the same place as ours, so its pid, absent here, makes its
    live lease "dead" and it is taken over at once while it still sends."""
    monkeypatch.setattr(lease, "_boot_id", lambda: "?")
    monkeypatch.setattr(lease, "_pid_namespace", lambda: "4026531836")
    lease._place.cache_clear()
    try:
        other_machine = f"{lease._place()}:999999:abcdef12"  # live, on the other host
        assert not lease.is_dead_local_owner(other_machine), (
            f"{other_machine} judged dead though our boot id is unknown"
        )
    finally:
        lease._place.cache_clear()


def test_a_stale_planner_never_supersedes_the_new_holders_plan(
    workspace: Workspace, engine: Engine, gist: FakeGist, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review's counterexample: a run (A) stages the old file, then freezes past its lease
    (its heartbeat frozen too). The file gains u10..u19; another worker (B) takes the
    expired lease over and plans the ten entries. A woke and planned: ``start_plan``
    superseded B's pending changes, B found nothing pending, ended ``succeeded`` with nothing
    delivered, and every later run took the fast path (the file unchanged since B): u10..u19
    never reached Gist. Planning is fenced on the lease now (``lease.Holder.confirm``)."""
    workspace.state_options.update(lease_seconds=3)
    workspace.gist_options.update(timeout_seconds=1)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(10))
    [first] = run_once(workspace.settings(), engine)
    assert first.status == "succeeded"
    assert in_gist(gist) == users(*range(10))

    a_staged, go_a, b_planned, go_b = (threading.Event() for _ in range(4))
    with Presence(engine, "run") as worker_a, Presence(engine, "run") as worker_b:
        real_start, real_stage, real_deliver = lease.Holder.start, sync._stage, sync._deliver

        def start(self: lease.Holder) -> None:
            if self.owner != worker_a.id:  # A is frozen: its heartbeat too
                real_start(self)

        def stage(ctx: Any, *args: Any) -> Any:
            result = real_stage(ctx, *args)
            if ctx.owner == worker_a.id:
                a_staged.set()
                assert go_a.wait(30)
            return result

        async def deliver(ctx: Any, *args: Any) -> Any:
            if ctx.owner == worker_b.id:
                b_planned.set()
                assert await asyncio.to_thread(go_b.wait, 30)
            return await real_deliver(ctx, *args)

        monkeypatch.setattr(lease.Holder, "start", start)
        monkeypatch.setattr(sync, "_stage", stage)
        monkeypatch.setattr(sync, "_deliver", deliver)
        out: dict[str, Any] = {}

        def run(name: str, worker: Presence, **options: Any) -> None:
            out[name] = run_once(workspace.settings(), engine, worker=worker, **options)

        thread_a = threading.Thread(target=run, args=("a", worker_a), kwargs={"full_diff": True})
        thread_a.start()
        assert a_staged.wait(30)
        time.sleep(3.5)  # A frozen past its lease
        write_members(source, range(20))
        thread_b = threading.Thread(target=run, args=("b", worker_b))
        thread_b.start()
        assert b_planned.wait(30)
        go_a.set()
        thread_a.join(30)
        go_b.set()
        thread_b.join(30)
    monkeypatch.undo()
    [a], [b] = out["a"], out["b"]
    assert (a.status, a.failure) == ("interrupted", "interrupted"), a  # fenced at planning
    assert (b.status, b.entered, b.delivered) == ("succeeded", 10, 10), b

    run_once(workspace.settings(), engine)
    assert in_gist(gist) == users(*range(20))
