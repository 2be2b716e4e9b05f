"""The job-running commands end to end: backfill, retire, history filters, prune, verify,
metrics file, alerts, JSON logs, the daemon (in-process and as a real process) and demo."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import OperationalError

from audience_sync import lease
from audience_sync.bars import ProgressBars
from audience_sync.cli import run_cli
from audience_sync.db import make_engine
from audience_sync.errors import StateError
from audience_sync.fakegist import FakeGist
from audience_sync.models import member_changes, sync_runs
from audience_sync.render import render_table
from audience_sync.sync import utcnow
from tests.conftest import API_KEY, Workspace, assert_no_traceback, run_process, write_members
from tests.helpers import KEY, acknowledged, free_port, in_gist, users


class Receiver:
    """A loopback webhook that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                outer.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=sekrit"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    hook.thread.start()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()
    hook.thread.join()


def test_backfill_and_retire_commands(workspace: Workspace, gist: FakeGist, cli: Any) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(5))
    assert cli("run")[0] == 0
    gist.clear_log()

    code, out, _ = cli("backfill", KEY, "--json")
    assert code == 0
    [result] = json.loads(out)
    assert (result["kind"], result["delivered"]) == ("backfill", 5)
    assert len(gist.requests()) == 5

    code, _, err = cli("retire", KEY)
    assert code == 2
    assert "still configured" in err

    workspace.audiences.clear()
    workspace.add_file_audience("Newsletter Signups")
    code, _, err = cli("run")
    assert f"audience-sync retire {KEY}" in err  # state left behind is pointed out
    code, out, _ = cli("retire", KEY, "--json")
    assert code == 0
    assert json.loads(out)[0]["exited"] == 5
    assert in_gist(gist) == set()


def test_history_filters_show_pages_and_prune(
    workspace: Workspace, engine: Engine, gist: FakeGist, cli: Any
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [*range(7), ("u9", "bad")])
    gist.fail_user("u6", 422)
    assert cli("run")[0] == 1  # partial

    _, out, _ = cli("history", "--json", "--status", "partial")
    [partial] = json.loads(out)
    _, out, _ = cli("history", "--json", "--status", "succeeded")
    assert json.loads(out) == []
    _, out, _ = cli("history", "--json", "--since", "1h")
    assert len(json.loads(out)) == 1
    _, out, _ = cli("history", "--json", "--since", "2999-01-01")
    assert json.loads(out) == []
    with pytest.raises(SystemExit, match="2"):
        cli("history", "--since", "soon")  # argparse: a usage error, exit 2

    _, out, _ = cli("show", str(partial["id"]), "--json", "--limit", "3")
    first = json.loads(out)
    assert first["changes"][0]["status"] == "failed"  # failed first
    assert "422" in str(first["changes"][0]["http_status"])
    _, out, _ = cli("show", str(partial["id"]), "--json", "--limit", "3", "--page", "3")
    assert len(json.loads(out)["changes"]) == 1  # 7 changes: 3 + 3 + 1
    _, out, _ = cli("show", str(partial["id"]), "--limit", "3")
    assert f"show {partial['id']} --page 2" in out

    with engine.begin() as connection:
        connection.execute(update(sync_runs).values(started_at=utcnow() - timedelta(days=100)))
    code, out, _ = cli("prune", "--older-than", "90d", "--json")
    assert code == 0
    assert json.loads(out) == {
        "member_changes": 7, "rejected_rows": 1, "workers": 0, "dry_run": False,
    }  # fmt: skip
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(member_changes)) == 0
        assert connection.scalar(select(func.count()).select_from(sync_runs)) == 1
    with pytest.raises(SystemExit, match="2"):
        cli("prune", "--older-than", "whenever")


def test_verify_command(workspace: Workspace, engine: Engine, gist: FakeGist, cli: Any) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(5))
    cli("run")
    code, out, _ = cli("verify", KEY, "--json")
    assert code == 0
    assert json.loads(out)["matching"] == 5
    httpx.post(
        f"{gist.url}/contacts",
        json={"user_id": "u2", "custom_properties": {KEY: False}},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    owner = "another-host:1:run"  # a run of the key under way elsewhere
    lease.acquire(engine, KEY, owner, 60)
    code, _, err = cli("verify", KEY, "--repair")
    assert code == 3
    assert f"audience {KEY!r} is being synced by {owner}: nothing was checked" in err
    lease.release(engine, [KEY], owner)
    code, out, _ = cli("verify", KEY, "--repair")
    assert code == 1
    assert "1 drifted" in out
    cli("run")
    assert in_gist(gist) == users(*range(5))
    assert cli("verify", KEY, "--sample", "3")[0] == 0


def test_metrics_file_alerts_and_json_logs(
    workspace: Workspace, gist: FakeGist, cli: Any, receiver: Receiver
) -> None:
    workspace.sections["alerts"] = {"webhook_url": receiver.url}
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(3))
    metrics = workspace.root / "audience_sync.prom"

    assert cli("run", "--metrics-file", str(metrics))[0] == 0
    assert receiver.bodies == []  # nothing to alert about
    text = metrics.read_text()
    assert f'audience_sync_runs_total{{audience="{KEY}",status="succeeded"}} 1.0' in text
    assert 'audience_sync_gist_responses_total{endpoint="push_contact",status="200"} 3.0' in text

    gist.fail_after(0, 401)
    write_members(source, range(4))
    code, _, err = cli("run", "--log-format", "json", "--quiet")
    assert code == 1
    [alert] = receiver.bodies
    assert alert["runs"][0]["status"] == "failed"
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any("API key" in r["message"] for r in records)
    assert "sekrit" not in err


def test_daemon_once_runs_due_audiences(
    workspace: Workspace, gist: FakeGist, engine: Engine, cli: Any
) -> None:
    heartbeat = workspace.root / "heartbeat.json"
    workspace.sections["daemon"] = {"heartbeat_file": str(heartbeat)}
    source = workspace.add_file_audience("Order Completed Last 30days", every="1h")
    write_members(source, range(3))
    workspace.add_file_audience("Unscheduled")

    code, _, err = cli("daemon", "--once")

    assert code == 0
    assert acknowledged(engine) == users(0, 1, 2)
    assert json.loads(heartbeat.read_text())["pid"] == os.getpid()
    assert f"run {KEY}: succeeded" in err
    gist.clear_log()
    assert cli("daemon", "--once")[0] == 0  # ran a moment ago: not due
    assert gist.requests() == []


@pytest.mark.slow
def test_daemon_process_serves_metrics_reloads_and_stops_on_sigterm(
    workspace: Workspace, gist: FakeGist, engine: Engine
) -> None:
    port = free_port()
    heartbeat = workspace.root / "heartbeat.json"
    workspace.sections["daemon"] = {"heartbeat_file": str(heartbeat), "metrics_port": port}
    source = workspace.add_file_audience("Order Completed Last 30days", every="1h")
    write_members(source, range(3))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "daemon", "--config", str(workspace.config_path)],
        env={**os.environ, "GIST_API_KEY": API_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while acknowledged(engine) != users(0, 1, 2):  # the never-run audience runs at start
            assert time.monotonic() < deadline, "the daemon never synced"
            time.sleep(0.05)
        # The run's metrics are recorded a moment after its acknowledgements are saved.
        counted = f'audience_sync_runs_total{{audience="{KEY}",status="succeeded"}} 1.0'
        while counted not in httpx.get(f"http://127.0.0.1:{port}/metrics").text:
            assert time.monotonic() < deadline, "the run was never counted in /metrics"
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["status"] == "ok"

        other = workspace.add_file_audience("Newsletter Signups", every="2h")
        write_members(other, [7])
        daemon.send_signal(signal.SIGHUP)
        while in_gist(gist, "newsletter_signups") != {"u7"}:  # added by the reload, due now
            assert time.monotonic() < deadline, "the reload was not applied"
            time.sleep(0.05)
        assert "newsletter_signups" in httpx.get(f"http://127.0.0.1:{port}/healthz").text
    finally:
        daemon.send_signal(signal.SIGTERM)
        _out, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    assert f"run {KEY}: succeeded" in err


def test_demo_runs_the_whole_cycle(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_cli(["demo", "--keep", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "Fake Gist at http://127.0.0.1:" in out
    assert "3. Nothing changed" in out
    assert "0 requests." in out
    assert (tmp_path / "demo" / "state.db").exists()


def test_progress_bars_count_rows_and_changes() -> None:
    stream = StringIO()
    with ProgressBars(stream) as bars:
        bars.loaded(KEY, 5000)
        bars.loaded(KEY, 1200)
        bars.planned(40)
        bars.sent(25)
        tasks = {t.description: (t.completed, t.total) for t in bars._bars.tasks}
    assert tasks == {f"load {KEY}": (6200, 6200), "send changes": (25, 40)}
    assert "send changes" in stream.getvalue()


@pytest.mark.slow
def test_a_piped_verbose_run_logs_each_retry_and_its_progress(
    workspace: Workspace, gist: FakeGist, engine: Engine
) -> None:
    """With -v, a Gist that could not be reached was 33 s of silence, and output that is not
    a terminal never showed progress."""
    workspace.gist_options |= {"max_concurrency": 1, "retry_backoff_seconds": 0.2}
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(20))
    gist.fail_next(2, 503)

    done = run_process("run", "-v", "--config", str(workspace.config_path), env=workspace.env)

    assert done.returncode == 0, done.stderr
    assert_no_traceback(done.stderr)
    retries = [line for line in done.stderr.splitlines() if "Gist request failed" in line]
    assert len(retries) == 2, done.stderr
    assert "on attempt 1/4 (HTTP 503: Service unavailable); retrying in 0." in retries[0]
    assert "on attempt 2/4 (HTTP 503: Service unavailable); retrying in 0." in retries[1]
    progress = [
        line.split(": ", 1)[1] for line in done.stderr.splitlines() if "send changes" in line
    ]
    assert progress[0] == "send changes: 20 planned"
    shares = [int(line.split("(")[1].split("%)")[0]) for line in progress[1:]]
    # A line at each further tenth (answers may come a few at a time), the last at 100%.
    assert len(shares) >= 7, progress
    assert shares == sorted(set(shares)), progress
    assert shares[-1] == 100, progress


def test_tables_are_plain_when_piped_and_rich_on_a_terminal() -> None:
    rows = [{"audience": "vip", "status": "failed", "members": 12}]
    piped, terminal = StringIO(), StringIO()
    render_table(rows, ("audience", "status", "members"), piped, tty=False)
    render_table(rows, ("audience", "status", "members"), terminal, tty=True)
    assert piped.getvalue().splitlines() == [
        "audience  status  members",
        "vip       failed       12",
    ]
    assert "\x1b[" in terminal.getvalue()  # colour
    assert "─" in terminal.getvalue()  # a rule under the header


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("history", "--since", "99999999999d"), "argument --since: '99999999999d' is longer"),
        (("history", "--limit", "0"), "argument --limit/-n: 0 is not a whole number from 1"),
        (("history", "--limit", "-3"), "argument --limit/-n: -3 is not a whole number from 1"),
        (("prune", "--older-than", "99999999d"), "argument --older-than: '99999999d' is longer"),
        (("prune", "--older-than", "soon"), "argument --older-than: 'soon' is not an age"),
        (("show", "1", "--page", "1e17"), "argument --page: 1e17 is not a whole number from 1"),
        (("show", "1", "--page", "100000000000000000"), "argument --page: 100000000000000000"),
        (("show", "1", "--limit", "0"), "argument --limit/-n: 0 is not a whole number from 1"),
        (("show", "99999999999999999999"), "argument RUN_ID: 99999999999999999999 is not"),
        (("verify", KEY, "--sample", "-5"), "argument --sample: -5 is not a whole number from 1"),
    ],
    ids=[
        "since-overflows",
        "history-limit-zero",
        "history-limit-negative",
        "prune-overflows",
        "prune-not-an-age",
        "page-float",
        "page-huge",
        "show-limit-zero",
        "run-id-huge",
        "sample-negative",
    ],
)
def test_numeric_flags_are_bounded_with_the_flag_named(
    workspace: Workspace, cli: Any, capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
    fragment: str,
) -> None:  # fmt: skip
    workspace.add_file_audience("Order Completed Last 30days")
    with pytest.raises(SystemExit) as info:
        cli(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err


def test_prune_takes_zero_and_weeks_and_has_a_dry_run(
    workspace: Workspace, engine: Engine, gist: FakeGist, cli: Any
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [*range(3), ("u9", "bad")])
    assert cli("run")[0] == 0
    with engine.begin() as connection:
        connection.execute(update(sync_runs).values(started_at=utcnow() - timedelta(days=8)))

    code, out, _ = cli("prune", "--older-than", "2w", "--json")
    assert (code, json.loads(out)) == (
        0, {"member_changes": 0, "rejected_rows": 0, "workers": 0, "dry_run": False},
    )  # fmt: skip

    code, out, _ = cli("prune", "--older-than", "1w", "--dry-run")
    assert code == 0
    assert "would delete 3 member_changes, 1 rejected_rows and 0 workers (dry run)" in out
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(member_changes)) == 3

    code, out, _ = cli("prune", "--older-than", "0d", "--json")
    # The run's worker row too: it stopped, so it is gone for any age.
    assert (code, json.loads(out)) == (
        0, {"member_changes": 3, "rejected_rows": 1, "workers": 1, "dry_run": False},
    )  # fmt: skip


def test_cron_runs_alert_on_a_change_of_state_and_announce_recovery(
    workspace: Workspace, gist: FakeGist, cli: Any, receiver: Receiver
) -> None:
    workspace.sections["alerts"] = {"webhook_url": receiver.url}
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(3))
    gist.fail_user("u1", 422)
    codes = [cli("run", "--quiet")[0] for _ in range(3)]  # each `run` is its own invocation
    assert codes == [1, 1, 1]
    assert [r["alert"] for body in receiver.bodies for r in body["runs"]] == ["failing"]

    gist.reset_faults()
    assert cli("run", "--quiet")[0] == 0
    assert [r["alert"] for body in receiver.bodies for r in body["runs"]] == [
        "failing",
        "recovered",
    ]
    assert receiver.bodies[-1]["runs"][0]["status"] == "succeeded"


def test_metrics_file_in_a_missing_folder_fails_before_syncing(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(3))
    target = workspace.root / "no" / "such" / "folder" / "audience_sync.prom"

    code, _out, err = cli("run", "--metrics-file", str(target))

    assert code == 2
    assert f"--metrics-file {target}: folder {target.parent} does not exist" in err
    assert "Traceback" not in err
    assert gist.requests() == []  # nothing was synced


@pytest.mark.parametrize("fail_one", [False, True], ids=["good-run", "failing-run"])
def test_metrics_file_lost_during_the_sync_keeps_the_result_and_the_alert(
    workspace: Workspace, gist: FakeGist, cli: Any, receiver: Receiver, fail_one: bool
) -> None:
    workspace.sections["alerts"] = {"webhook_url": receiver.url}
    workspace.gist_options["max_concurrency"] = 1
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(3))
    folder = workspace.root / "textfiles"
    folder.mkdir()
    if fail_one:
        gist.fail_user("u2", 422)
    gist.latency = 0.3

    def remove_folder_once_syncing() -> None:
        deadline = time.monotonic() + 10
        while not gist.requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        folder.rmdir()

    remover = threading.Thread(target=remove_folder_once_syncing)
    remover.start()
    code, out, err = cli("run", "--metrics-file", str(folder / "audience_sync.prom"))
    remover.join()

    assert code == (1 if fail_one else 0)  # what the sync did, whatever the metrics file did
    assert "cannot write --metrics-file" in err
    assert "Traceback" not in err
    assert KEY in out  # the summary is still printed
    assert [r["alert"] for body in receiver.bodies for r in body["runs"]] == (
        ["failing"] if fail_one else []
    )


def test_last_success_metric_survives_a_failed_run(
    workspace: Workspace, gist: FakeGist, engine: Engine, cli: Any
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(3))
    metrics = workspace.root / "audience_sync.prom"
    assert cli("run", "--metrics-file", str(metrics))[0] == 0
    with engine.connect() as connection:
        finished = connection.scalar(select(sync_runs.c.finished_at))
    gist.fail_user("u4", 422)
    write_members(source, range(5))

    assert cli("run", "--metrics-file", str(metrics))[0] == 1

    line = f'audience_sync_last_success_timestamp_seconds{{audience="{KEY}"}}'
    [value] = [float(x.split()[-1]) for x in metrics.read_text().splitlines() if x.startswith(line)]
    assert finished is not None
    assert value == pytest.approx(finished.replace(tzinfo=UTC).timestamp(), abs=0.01)


def test_daemon_with_nothing_scheduled_exits_2(workspace: Workspace, cli: Any) -> None:
    workspace.add_file_audience("Unscheduled")
    for args in (("daemon",), ("daemon", "--once")):
        code, _out, err = cli(*args)
        assert code == 2
        assert "no audience or trait has a `schedule` or `every`" in err


def test_daemon_whose_metrics_port_is_taken_exits_2_naming_it(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        workspace.sections["daemon"] = {"metrics_port": port}
        workspace.add_file_audience("Order Completed Last 30days", every="1h")
        code, _out, err = cli("daemon")
    assert code == 2
    assert f"daemon.metrics_port: cannot serve /metrics on 127.0.0.1:{port}" in err
    assert "Traceback" not in err
    assert gist.requests() == []


def start_daemon(workspace: Workspace, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "audience_sync", "daemon", *extra, "--config",
         str(workspace.config_path)],
        env={**os.environ, "GIST_API_KEY": API_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def wait_for(condition: Any, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def run_statuses(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(select(sync_runs.c.status).order_by(sync_runs.c.id)))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_daemon_once_stops_gracefully_on_signals_like_run(
    workspace: Workspace, gist: FakeGist, engine: Engine, signum: signal.Signals
) -> None:
    workspace.gist_options["max_concurrency"] = 1
    source = workspace.add_file_audience("Order Completed Last 30days", every="1h")
    write_members(source, range(40))
    gist.latency = 0.05  # 40 members one at a time: about 2 s of sending
    process = start_daemon(workspace, "--once")
    try:
        wait_for(lambda: len(gist.requests()) >= 3, "the first requests")
        process.send_signal(signum)
        _out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 1, err  # interrupted, as `run` exits
    assert run_statuses(engine) == ["interrupted"]
    acknowledged_count = len(acknowledged(engine))
    assert 3 <= acknowledged_count < 40
    assert "finishing requests in flight" in err

    gist.clear_log()
    gist.latency = 0.0
    assert subprocess.run(
        [sys.executable, "-m", "audience_sync", "run", "--config", str(workspace.config_path)],
        env={**os.environ, "GIST_API_KEY": API_KEY}, capture_output=True, check=False,
    ).returncode == 0  # fmt: skip
    sent = [r.body["user_id"] for r in gist.requests("/contacts")]
    assert len(sent) == 40 - acknowledged_count  # a graceful stop sends nothing twice
    assert in_gist(gist) == users(*range(40))


@pytest.mark.slow
def test_a_hanging_webhook_never_holds_up_syncing_or_stopping(
    workspace: Workspace, gist: FakeGist, engine: Engine
) -> None:
    hook = socket.socket()
    hook.bind(("127.0.0.1", 0))
    hook.listen()
    opened: list[float] = []
    stop_hook = threading.Event()

    def trickle() -> None:  # accepts, then answers one byte every 2 s, forever
        hook.settimeout(0.1)
        conns = []
        while not stop_hook.is_set():
            try:
                conn, _ = hook.accept()
                conns.append(conn)
                opened.append(time.time())
            except TimeoutError:
                pass
            if conns and int(time.monotonic() * 10) % 20 == 0:
                for conn in conns:
                    with contextlib.suppress(OSError):
                        conn.sendall(b"H")
        for conn in conns:
            conn.close()

    thread = threading.Thread(target=trickle)
    thread.start()
    port = free_port()
    workspace.sections["alerts"] = {
        "webhook_url": f"http://127.0.0.1:{hook.getsockname()[1]}/hook",
        "timeout_seconds": 60,
    }
    # Partial runs count as failing; the health rule's run count is not under test here.
    workspace.sections["daemon"] = {"metrics_port": port, "health_failed_runs": 1000}
    source = workspace.add_file_audience("Order Completed Last 30days", every="1s")
    write_members(source, range(3))
    gist.fail_user("u1", 422)  # every run is partial: the first one alerts
    process = start_daemon(workspace)
    try:
        wait_for(lambda: opened, "the alert to reach the webhook")
        wait_for(lambda: len(run_statuses(engine)) >= 4, "runs while the alert hangs")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
        stopped_in = time.monotonic() - asked
    finally:
        process.kill()
        stop_hook.set()
        thread.join()
        hook.close()
    assert process.returncode == 0, err
    assert stopped_in < 10, f"SIGTERM took {stopped_in:.1f}s with an alert hanging"
    assert "stopping with an alert still in flight" in err
    assert len(opened) == 1  # one alert for the change of state, not one per failed run


@pytest.mark.slow
def test_healthz_reports_failing_audiences_and_recovers(
    workspace: Workspace, gist: FakeGist, engine: Engine
) -> None:
    port = free_port()
    workspace.sections["daemon"] = {"metrics_port": port, "health_failed_runs": 3}
    source = workspace.add_file_audience("Order Completed Last 30days", every="1s")
    write_members(source, range(3))
    process = start_daemon(workspace)
    healthz = f"http://127.0.0.1:{port}/healthz"
    try:
        wait_for(lambda: run_statuses(engine)[-1:] == ["succeeded"], "a first good run")
        assert httpx.get(healthz).status_code == 200
        source.write_text("{not json\n")  # every run now fails reading its source
        wait_for(lambda: httpx.get(healthz).status_code == 503, "an unhealthy answer")
        answer = httpx.get(healthz).json()
        assert answer["reasons"] == ["the last 3 runs of every audience failed"]
        assert run_statuses(engine)[-3:] == ["failed"] * 3
        write_members(source, range(3))
        wait_for(lambda: httpx.get(healthz).status_code == 200, "recovery")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert f'audience_sync_last_success_timestamp_seconds{{audience="{KEY}"}}' in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err


def test_verify_reports_gist_errors_as_errors_not_drift(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(5))
    assert cli("run")[0] == 0

    gist.fail_after(0, 401)
    code, out, err = cli("verify", KEY)
    assert code == 2
    assert "Gist refused the API key" in err
    assert "drifted" not in out + err
    gist.reset_faults()

    gist.fail_user("u3", 422, "Nope")
    code, out, err = cli("verify", KEY, "--json")
    assert code == 2
    report = json.loads(out)
    assert (report["matching"], report["drifted"]) == (4, [])
    assert report["errors"] == [{"user_id": "u3", "error": "HTTP 422: Nope"}]
    code, out, _ = cli("verify", KEY)
    assert "4 of 5 sampled members carry the expected value; 0 drifted; 1 could not be read" in out
    gist.reset_faults()

    workspace.gist_url = f"http://127.0.0.1:{free_port()}"
    workspace.gist_options["max_retries"] = 0
    workspace.write_config()
    code, out, err = cli("verify", KEY)
    assert code == 2
    assert f"cannot reach Gist at {workspace.gist_url}" in err
    assert "drifted" not in out + err


def test_ctrl_c_in_demo_stops_without_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import audience_sync.demo

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread mid-sync

    monkeypatch.setattr(audience_sync.demo, "run_once", interrupted)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    try:
        code = run_cli(["demo"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped from the demo as a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert "demo interrupted" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone too


@pytest.mark.slow
def test_a_second_sigterm_stops_a_daemon_whose_sync_is_stuck(
    workspace: Workspace, gist: FakeGist, engine: Engine
) -> None:
    workspace.gist_options["timeout_seconds"] = 30
    source = workspace.add_file_audience("Order Completed Last 30days", every="1h")
    write_members(source, range(3))
    gist.latency = 8  # every request hangs longer than the test waits for the stop
    process = start_daemon(workspace)
    try:
        wait_for(lambda: run_statuses(engine) == ["running"], "the run to start")
        # Its requests in flight, known rather than guessed: on a busy machine, half a
        # second after its start a run may not have sent one, and the first SIGTERM stops it.
        wait_for(lambda: gist.in_flight, "its requests in flight")
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.poll() is None  # the first one waits for the requests in flight
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
        stopped_in = time.monotonic() - asked
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert stopped_in < 5, f"the second SIGTERM took {stopped_in:.1f}s"
    assert "SIGTERM again: stopping now" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_daemon_whose_sqlite_state_file_vanishes_fails_loudly_and_writes_nothing(
    tmp_path: Path, gist: FakeGist
) -> None:
    """Removing ``state.db*`` under a running daemon made its runs "succeed" into the
    unlinked file, /healthz stayed 200, and everything was lost at restart."""
    state = tmp_path / "state.db"
    workspace = Workspace(tmp_path, f"sqlite:///{state}", gist.url)
    port = free_port()
    workspace.sections["daemon"] = {"metrics_port": port}
    source = workspace.add_file_audience("Order Completed Last 30days", every="1s")
    write_members(source, range(3))
    healthz = f"http://127.0.0.1:{port}/healthz"
    process = start_daemon(workspace)
    try:
        engine = make_engine(workspace.state_url)

        def synced() -> bool:
            try:
                return "succeeded" in run_statuses(engine)
            except OperationalError:  # the daemon has not migrated the new file yet
                return False

        wait_for(synced, "a first good run")
        engine.dispose()
        for file in tmp_path.glob("state.db*"):
            file.unlink()
        write_members(source, range(5))  # two enter: a run would send and "record" them
        gist.clear_log()
        wait_for(lambda: httpx.get(healthz).status_code == 503, "an unhealthy answer")
        answer = httpx.get(healthz).json()
        assert any("StateError" in reason for reason in answer["reasons"]), answer
        time.sleep(2)  # ticks go on failing
        assert gist.requests() == []  # nothing sent that could only be recorded in the ghost
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    assert f"the state file {state} was deleted while audience-sync was running" in err
    assert "Traceback" not in err


def test_a_replaced_sqlite_state_file_is_refused_before_any_transaction(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    engine = make_engine(f"sqlite:///{state}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    other = tmp_path / "other.db"
    other.write_bytes(state.read_bytes())
    os.replace(other, state)  # a restore from backup under a running process, say

    with pytest.raises(StateError, match="was replaced by another file"), engine.begin():
        pass
    engine.dispose()
    fresh = make_engine(f"sqlite:///{state}")  # a process started now uses the new file
    with fresh.begin() as connection:
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
    fresh.dispose()
