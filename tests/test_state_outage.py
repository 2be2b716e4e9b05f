"""A daemon whose state PostgreSQL is cut off: by a partition (packets dropped, no reset: a
TCP proxy that stops forwarding) or an outage (connections refused). ``/healthz`` answers at
once and says why, SIGTERM stops within its bound, the log says one line per failed tick,
and the daemon recovers when the database is back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url

from audience_sync import db
from audience_sync.fakegist import FakeGist
from audience_sync.models import sync_runs
from audience_sync.workers import list_workers
from tests.conftest import API_KEY, Workspace, assert_no_traceback, write_members
from tests.helpers import KEY, PausableProxy, acknowledged, free_port, fresh_state_url, users

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TIMEOUT = 2  # gist.timeout_seconds: a stop may take this + 10 s (scheduler.STOP_MARGIN_SECONDS)
STOP_BOUND = TIMEOUT + 10


@pytest.fixture
def state(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    """A fresh schema on the local PostgreSQL, migrated: its URL and a direct engine."""
    with fresh_state_url("postgresql", tmp_path) as url:
        engine = db.make_engine(url)
        db.upgrade(engine)
        try:
            yield url, engine
        finally:
            engine.dispose()


@pytest.fixture
def proxy() -> Iterator[PausableProxy]:
    with PausableProxy(("127.0.0.1", 5432)) as between:
        yield between


def through(url: str, proxy: PausableProxy) -> str:
    """``url`` with the proxy's port: the daemon reaches the database through it."""
    return make_url(url).set(port=proxy.port).render_as_string(hide_password=False)


class Daemon:
    """A daemon process whose stderr goes to a file, so a test can read its log while it
    runs (and wait for a line instead of guessing how long it takes to be written)."""

    def __init__(self, workspace: Workspace, *extra: str) -> None:
        self.log = workspace.root / "daemon.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "audience_sync", "daemon", *extra, "--config",
                 str(workspace.config_path)],
                env={**os.environ, "GIST_API_KEY": API_KEY},
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
            )  # fmt: skip

    @property
    def err(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def wait_for(condition: object, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def wait_for_daemon(daemon: Daemon, condition: object, what: str, seconds: float = 30) -> None:
    """``wait_for``, and on a timeout the daemon's log in the failure: what it was doing."""
    try:
        wait_for(condition, what, seconds)
    except AssertionError as exc:
        daemon.kill()
        raise AssertionError(f"{exc}; the daemon's log:\n{daemon.err}") from None


def statuses(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(select(sync_runs.c.status).order_by(sync_runs.c.id)))


def daemon_workspace(
    tmp_path: Path, url: str, gist: FakeGist, every: str, **daemon: object
) -> tuple[Workspace, Path]:
    workspace = Workspace(tmp_path, url, gist.url)
    workspace.gist_options["timeout_seconds"] = TIMEOUT
    workspace.sections["daemon"] = dict(daemon)
    source = workspace.add_file_audience("Order Completed Last 30days", every=every)
    write_members(source, range(3))
    return workspace, source


def stop(daemon: Daemon, within: float) -> tuple[float, str]:
    """SIGTERM, then the seconds it took to exit and its stderr."""
    asked = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    try:
        daemon.process.wait(timeout=within + 20)
    except subprocess.TimeoutExpired:
        daemon.kill()
        pytest.fail(f"SIGTERM did not stop the daemon within {within + 20}s:\n{daemon.err}")
    return time.monotonic() - asked, daemon.err


def test_a_partition_makes_healthz_503_at_once_sigterm_has_a_bound_and_the_daemon_recovers(
    tmp_path: Path, gist: FakeGist, state: tuple[str, Engine], proxy: PausableProxy
) -> None:
    """Before: /healthz never answered (10 of 10 probes timed out) and SIGTERM waited for
    the network to come back."""
    url, engine = state
    port = free_port()
    workspace, source = daemon_workspace(
        tmp_path, through(url, proxy), gist, "1s", metrics_port=port
    )
    healthz = f"http://127.0.0.1:{port}/healthz"
    daemon = Daemon(workspace)
    try:
        wait_for(lambda: acknowledged(engine) == users(0, 1, 2), "a first sync")
        assert httpx.get(healthz).status_code == 200

        proxy.partition()
        answers: list[tuple[int, float]] = []

        def unhealthy() -> bool:
            asked = time.monotonic()
            answer = httpx.get(healthz, timeout=5)
            answers.append((answer.status_code, time.monotonic() - asked))
            reasons = answer.json().get("reasons", [])
            return answer.status_code == 503 and any(
                r.startswith("the state database has not answered for ") for r in reasons
            )

        wait_for(unhealthy, "/healthz to say the state database does not answer")
        assert max(seconds for _status, seconds in answers) < 1, answers  # never held
        # The log says so too: wait for the line (its watcher wakes every 0.2 s, so it can
        # come a moment after /healthz), or a quick heal would race it.
        wait_for_daemon(
            daemon,
            lambda: "the state database has not answered for 10s" in daemon.err,
            "the log to say the state database does not answer",
            seconds=5,
        )

        proxy.heal()
        wait_for(lambda: httpx.get(healthz).status_code == 200, "/healthz to recover")
        write_members(source, range(5))
        wait_for(lambda: acknowledged(engine) == users(*range(5)), "a sync after the partition")

        proxy.partition()
        time.sleep(2)  # a tick's sync now waits on the database
        took, err = stop(daemon, STOP_BOUND)
    finally:
        daemon.kill()
    assert took < STOP_BOUND + 2, f"SIGTERM took {took:.1f}s:\n{err}"
    assert daemon.process.returncode == 1, err
    assert f"not stopped within {STOP_BOUND}s (gist.timeout_seconds + 10 s)" in err
    assert "the state database answers again" in err
    assert_no_traceback(err)


def test_sigterm_stops_an_idle_daemon_in_seconds_whatever_the_partition(
    tmp_path: Path, gist: FakeGist, state: tuple[str, Engine], proxy: PausableProxy
) -> None:
    url, engine = state
    workspace, _source = daemon_workspace(tmp_path, through(url, proxy), gist, "1h")
    daemon = Daemon(workspace)
    try:
        # Idle: the start-up run recorded, and the daemon no longer running it (its worker
        # row says so at once); partitioned before that, the sync is not idle but stuck.
        wait_for(
            lambda: (
                statuses(engine) == ["succeeded"]
                and [w.running for w in list_workers(engine)] == [[]]
            ),
            "the start-up run, ended",
        )
        proxy.partition()
        time.sleep(1)
        took, err = stop(daemon, STOP_BOUND)
    finally:
        daemon.kill()
    assert daemon.process.returncode == 0, err  # nothing was left undone but recording the stop
    assert took < 8, f"SIGTERM took {took:.1f}s:\n{err}"  # workers.STOP_RECORD_SECONDS + 3
    assert "could not record this worker's stop" in err
    assert_no_traceback(err)


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_state_database_outage_logs_one_line_per_failed_tick(
    tmp_path: Path,
    gist: FakeGist,
    state: tuple[str, Engine],
    proxy: PausableProxy,
    verbose: bool,
) -> None:
    """Before: a full traceback at every tick (21 in a 20 s outage)."""
    url, engine = state
    workspace, _source = daemon_workspace(tmp_path, through(url, proxy), gist, "1s")
    daemon = Daemon(workspace, *(["-v"] if verbose else []))
    try:
        wait_for_daemon(daemon, lambda: "succeeded" in statuses(engine), "a first sync")
        proxy.refuse()
        time.sleep(4)  # about four ticks
        proxy.heal()
        runs = len(statuses(engine))
        wait_for_daemon(daemon, lambda: len(statuses(engine)) > runs + 1, "syncs after the outage")
        _took, err = stop(daemon, STOP_BOUND)
    finally:
        daemon.kill()
    assert daemon.process.returncode == 0, err
    failed = [line for line in err.splitlines() if f"sync of {KEY} failed: " in line]
    assert len(failed) >= 2, err
    assert all("the state database: OperationalError: " in line for line in failed), failed
    assert f"run {KEY}: failed" not in err  # said once, not twice
    if verbose:
        assert err.count("Traceback") >= len(failed)
    else:
        assert_no_traceback(err)
        outage = err[err.index(failed[0]) : err.index(failed[-1])]
        assert all(
            f"sync of {KEY} failed" in line or "the state database cannot be reached" in line
            for line in outage.splitlines()
        ), outage


def test_postgres_connections_carry_bounds_on_every_wait(state: tuple[str, Engine]) -> None:
    url, engine = state
    with engine.connect() as connection:
        parameters = connection.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
    assert {k: parameters.get(k) for k in db.LIBPQ_BOUNDS} == {
        k: str(v) for k, v in db.LIBPQ_BOUNDS.items()
    }
    own = db.make_engine(f"{url}&keepalives_idle=60")  # the URL's own setting wins
    try:
        with own.connect() as connection:
            parameters = connection.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        assert parameters["keepalives_idle"] == "60"
        assert parameters["tcp_user_timeout"] == "30000"
    finally:
        own.dispose()
