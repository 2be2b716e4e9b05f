"""Crash and concurrency suite with real processes: ``kill -9`` at several points, SIGTERM
and Ctrl-C during delivery, and several ``run`` processes racing over one audience."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

import pytest
from sqlalchemy import ColumnElement, Engine, Table, func, select

from audience_sync import lease
from audience_sync.fakegist import FakeGist
from audience_sync.ledger import ACK_BATCH
from audience_sync.models import member_changes, rejected_rows, sync_runs
from tests.conftest import API_KEY, Workspace, write_members
from tests.helpers import KEY, acknowledged, in_gist, users

pytestmark = pytest.mark.slow


def spawn(workspace: Workspace) -> subprocess.Popen[str]:
    """A real ``audience-sync run`` process on the workspace's config."""
    return subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "run", "--config", str(workspace.config_path)],
        env={**os.environ, "GIST_API_KEY": API_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the process never reached the point"
        time.sleep(0.01)


def count(engine: Engine, table: Table, *where: ColumnElement[bool]) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(table).where(*where)) or 0)


def sends_per_user(gist: FakeGist) -> Counter[str]:
    return Counter(
        r.body["user_id"] for r in gist.requests("/contacts") if r.status == 200 and r.body
    )


def recover(workspace: Workspace, gist: FakeGist) -> tuple[float, str]:
    gist.reset_faults()
    started = time.monotonic()
    process = spawn(workspace)
    out, err = process.communicate(timeout=120)
    elapsed = time.monotonic() - started
    assert process.returncode == 0, out + err
    return elapsed, err


def setup_audience(workspace: Workspace, members: int) -> None:
    workspace.gist_options.update(max_concurrency=4, requests_per_second=2000)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(members))


@pytest.mark.parametrize("point", ["loading", "planned", "delivering"])
def test_kill_9_then_next_run_completes(
    workspace: Workspace, engine: Engine, gist: FakeGist, point: str
) -> None:
    members = 1500
    setup_audience(workspace, members)
    if point == "loading":
        # A long source: the valid members come last, after many rows that are rejected.
        source = workspace.root / "0.jsonl"
        junk = '{"user_id": "j", "email": null}\n' * 150_000
        source.write_text(junk + source.read_text())
        reached = lambda: count(engine, rejected_rows) > 0  # noqa: E731
    elif point == "planned":
        gist.latency = 2  # nothing can be acknowledged before the kill
        reached = lambda: count(engine, member_changes) > 0  # noqa: E731
    else:
        gist.latency = 0.005
        reached = lambda: len(gist.requests()) >= 500  # noqa: E731

    process = spawn(workspace)
    wait_until(reached)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    acked_before = acknowledged(engine)
    assert acked_before <= in_gist(gist)  # nothing recorded that Gist did not acknowledge

    elapsed, err = recover(workspace, gist)
    if point == "planned":
        time.sleep(2.1)  # requests the dead process left in flight land late

    assert "took over the lease" in err  # the dead holder did not block us
    assert in_gist(gist) == acknowledged(engine) == users(*range(members))
    sends = sends_per_user(gist)
    duplicates = sum(n - 1 for n in sends.values())
    # Only what was in flight or acknowledged but not yet saved is sent twice.
    assert duplicates <= ACK_BATCH + 4
    with engine.connect() as connection:
        statuses = set(connection.scalars(select(sync_runs.c.status)))
    assert "running" not in statuses
    print(f"\nkill -9 {point}: acked before {len(acked_before)}, duplicates {duplicates}, "
          f"recovery {elapsed:.2f}s")  # fmt: skip


def test_kill_9_while_sending_events_resends_only_unsaved_ones(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    members = 600
    setup_audience(workspace, members)
    workspace.audiences[0]["send_track"] = True
    workspace.write_config()
    gist.latency = 0.005
    process = spawn(workspace)
    wait_until(lambda: len(gist.requests("/events")) >= 300)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    sent_before = len(gist.requests("/events"))

    elapsed, _err = recover(workspace, gist)

    events = Counter((e["user_id"], e["event_name"]) for e in gist.events())
    assert set(events) == {(f"u{n}", "Audience Entered") for n in range(members)}
    duplicates = sum(n - 1 for n in events.values())
    # Event acknowledgements are saved like contacts' (every ACK_BATCH, at least every
    # second): only those unsaved at the kill and those in flight are sent again.
    assert duplicates <= ACK_BATCH + 4
    with engine.connect() as connection:
        owed = connection.scalar(
            select(func.count()).where(member_changes.c.event_status != "delivered")
        )
    assert owed == 0
    print(f"\nkill -9 sending events: {sent_before} sent before, duplicates {duplicates}, "
          f"recovery {elapsed:.2f}s")  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_during_delivery_saves_acknowledged_work(
    workspace: Workspace, engine: Engine, gist: FakeGist, signum: int
) -> None:
    setup_audience(workspace, 1500)
    gist.latency = 0.01
    process = spawn(workspace)
    wait_until(lambda: len(gist.requests()) >= 300)

    process.send_signal(signum)
    out, err = process.communicate(timeout=30)

    assert process.returncode == 1, out + err
    assert "interrupted" in out
    with engine.connect() as connection:
        status = connection.scalar(select(sync_runs.c.status).order_by(sync_runs.c.id.desc()))
    assert status == "interrupted"
    # In-flight requests finished and every acknowledgement was saved.
    assert acknowledged(engine) == in_gist(gist)
    assert 300 <= len(acknowledged(engine)) < 1500
    recover(workspace, gist)
    assert in_gist(gist) == acknowledged(engine) == users(*range(1500))
    assert max(sends_per_user(gist).values()) == 1  # a graceful stop sends nothing twice


@pytest.mark.parametrize("processes", [2, 4], ids=["2-processes", "4-processes"])
def test_racing_processes_send_every_change_exactly_once(
    workspace: Workspace, engine: Engine, gist: FakeGist, processes: int
) -> None:
    setup_audience(workspace, 400)
    gist.latency = 0.01

    started = [spawn(workspace) for _ in range(processes)]
    codes = []
    for process in started:
        out, err = process.communicate(timeout=120)
        codes.append(process.returncode)
        assert process.returncode in (0, 3), out + err

    assert 0 in codes
    sends = sends_per_user(gist)
    assert set(sends) == users(*range(400))
    assert set(sends.values()) == {1}  # nothing twice, nothing missing
    assert acknowledged(engine) == in_gist(gist)
    print(f"\n{processes} racing processes: exit codes {sorted(codes)}")


def test_dead_local_owner_is_recognised() -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    mine = lease.new_owner()
    place = mine.rsplit(":", 2)[0]
    assert not lease.is_dead_local_owner(mine)
    assert lease.is_dead_local_owner(f"{place}:{finished.stdout.strip()}:abcd")
    assert not lease.is_dead_local_owner(f"elsewhere/1:{finished.stdout.strip()}:abcd")
    assert not lease.is_dead_local_owner("garbage")
    assert KEY  # the audience the suite uses
