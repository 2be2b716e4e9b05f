"""What the command line shows a newcomer: options in either place, one vocabulary, tables
that fit the terminal, errors once (text or JSON), hints that lead to `show` (issue 11)."""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import signal
import subprocess
import termios
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from audience_sync.cli import run_cli
from audience_sync.fakegist import FakeGist
from audience_sync.history import load_last_starts
from audience_sync.models import sync_runs
from audience_sync.sync import utcnow
from audience_sync.workers import Presence
from tests.conftest import (
    API_KEY,
    EXECUTABLE,
    Workspace,
    assert_no_traceback,
    invoker,
    write_members,
)
from tests.helpers import free_port

KEY = "order_completed_last_30days"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SHORT_TIME = re.compile(r"\b\d{4}-\d\d-\d\d \d\d:\d\d\b")


def run_on_terminal(args: list[str], columns: int) -> str:
    """Run the CLI on a pseudo-terminal ``columns`` wide; what it showed, colours removed."""
    master, slave = os.openpty()
    termios.tcsetwinsize(slave, (40, columns))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(
        [EXECUTABLE, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**env, "GIST_API_KEY": API_KEY, "TERM": "xterm-256color"},
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=60)
    os.close(master)
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


# ---------------------------------------------------------------- options and keys


def test_global_options_go_before_or_after_the_command(
    workspace: Workspace, gist: FakeGist, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_members(workspace.add_file_audience("Order Completed Last 30days"), [1])
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    config = str(workspace.config_path)

    assert run_cli(["--config", config, "-v", "--log-format", "json", "run", "--json"]) == 0
    # Given in both places, the one after the command wins.
    assert run_cli(["--config", "/nowhere.toml", "history", "--config", config]) == 0
    assert run_cli(["--config", config, "history", "--config", "/nowhere.toml"]) == 2


@pytest.mark.parametrize(
    "command",
    [
        ["history"],
        ["show", "1"],
        ["audiences"],
        ["prune", "--older-than", "90d"],
        ["db", "upgrade"],
    ],
    ids=["history", "show", "audiences", "prune", "db-upgrade"],
)
def test_commands_that_never_call_gist_need_no_api_key(
    workspace: Workspace,
    engine: Engine,
    gist: FakeGist,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    write_members(workspace.add_file_audience("Order Completed Last 30days"), [1])
    cli = invoker(workspace, capsys)
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    assert cli("run")[0] == 0
    monkeypatch.delenv("GIST_API_KEY")

    code, _, err = cli(*command)
    assert (code, err) == (0, "")

    code, _, err = cli("run")  # this one does call Gist
    assert code == 2
    assert "${GIST_API_KEY} is not set" in err


def test_one_vocabulary_run_id_and_audience_key_everywhere(
    workspace: Workspace, gist: FakeGist, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    write_members(workspace.add_file_audience("Order Completed Last 30days"), [1])

    _, out, _ = cli("run", "--json")
    [ran] = json.loads(out)
    _, out, _ = cli("history", "--json")
    [listed] = json.loads(out)
    _, out, _ = cli("show", str(ran["run_id"]), "--json")
    shown = json.loads(out)
    _, out, _ = cli("verify", KEY, "--json")
    verified = json.loads(out)
    _, out, _ = cli("audiences", "--json")
    [configured] = json.loads(out)

    for run in (ran, listed, shown):
        assert (run["run_id"], run["audience_key"]) == (ran["run_id"], KEY)
    assert verified["audience_key"] == configured["audience_key"] == KEY
    # The names a --json printed before stay beside the new ones until 0.3.
    assert ran["audience"] == listed["audience"] == shown["audience"] == configured["key"]
    assert listed["id"] == shown["id"] == ran["run_id"]
    # Tables say what --json says: no bare `id` or `audience` column anywhere.
    headers = [cli(*args)[1].splitlines()[0].split() for args in (["history"], ["audiences"])]
    headers.append(cli("run")[1].splitlines()[0].split())
    assert all("audience_key" in h and "id" not in h and "audience" not in h for h in headers)
    assert "run_id" in headers[0]
    assert run_cli(["demo"]) == 0
    demo = capsys.readouterr().out.split("4. The history:")[1].splitlines()[1].split()
    assert demo[:2] == ["run_id", "audience_key"]


def test_workers_are_worker_id(workspace: Workspace, engine: Engine, cli: Any) -> None:
    workspace.add_file_audience("VIP")
    with Presence(engine, "daemon") as alive:
        _, out, _ = cli("workers", "--json")
        [listed] = json.loads(out)
        assert listed["worker_id"] == listed["id"] == alive.id  # `id` until 0.3
        _, out, _ = cli("workers")
        assert out.split()[0] == "worker_id"


def _table(out: str) -> list[dict[str, str]]:
    """A plain (piped) table's rows as dicts of its header's columns (two spaces or more
    part them; a time holds one)."""
    header, *rows = [re.split(r" {2,}", line.strip()) for line in out.splitlines() if line.strip()]
    return [dict(zip(header, row, strict=False)) for row in rows]


def test_resent_contacts_are_shown_in_tables_json_and_the_daemon_line(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    # Every second, so that each `daemon --once` a second apart finds it due.
    source = workspace.add_file_audience("Order Completed Last 30days", every="1s")
    write_members(source, [1, 2, 3])
    assert cli("run")[0] == 0
    write_members(source, [(f"u{n}", f"new{n}@example.com") for n in (1, 2, 3)])

    code, out, _ = cli("run")

    assert code == 0
    [row] = _table(out)
    assert (row["entered"], row["exited"], row["resent"], row["delivered"]) == ("0", "0", "3", "3")
    [latest, _] = _table(cli("history")[1])
    assert (latest["resent"], latest["delivered"]) == ("3", "3")
    assert json.loads(cli("history", "--json", "-n", "1")[1])[0]["resent"] == 3

    write_members(
        source, [("u1", "third1@example.com"), ("u2", "x2@example.com"), ("u3", "new3@example.com")]
    )
    time.sleep(1.1)
    code, out, err = cli("daemon", "--once")
    assert code == 0
    assert f"run {KEY}: succeeded entered=0 exited=0 resent=2 delivered=2 " in err, err
    write_members(source, [1, 2, 3])
    time.sleep(1.1)
    code, out, _ = cli("run", "--json")
    assert json.loads(out)[0]["resent"] == 3


# ---------------------------------------------------------------- hints that lead to `show`


def test_failed_changes_and_rejected_rows_point_at_show(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [1, 2, ("u3", "not-an-email"), 4])
    gist.fail_user("u2", 422, "Email is invalid")
    config = workspace.config_path

    code, out, err = cli("run")

    assert code == 1
    run_id = json.loads(cli("history", "--json")[1])[0]["run_id"]
    show = f"see `audience-sync show {run_id} --config {config}`"
    assert f"{KEY}: 1 change failed (first: user u2: HTTP 422: Email is invalid); {show}" in out, (
        out
    )
    assert f"{KEY}: 1 source row rejected (first: row 3: invalid email); {show}" in out
    assert "changes failed" not in out  # the bare count no longer stands alone

    gist.fail_user("u5", 422, "Email is invalid")
    write_members(source, [1, 2, ("u3", "not-an-email"), 4, 5])
    code, out, err = cli("run", "--quiet")
    assert (code, out) == (1, "")
    assert "2 changes failed (first: user u2: HTTP 422: Email is invalid)" in err
    assert "rejected" not in err  # --quiet: errors only


def test_show_reads_true_after_prune_and_whatever_the_rows_hold(
    workspace: Workspace, engine: Engine, gist: FakeGist, cli: Any
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(
        source,
        [(str(n), f"u{n}@example.com") for n in (100, 2, 10, 1, 20)]
        + [("evil\nid", "e@example.com"), ("[/bold]", "not-an-email\u202e")],
    )
    gist.fail_user("20", 422, "Nope")
    assert cli("run")[0] == 1

    code, out, _ = cli("show", "1")

    assert code == 0
    fields = out.split("\n\nChanges")[0].splitlines()
    # Every field's value starts in one column; booleans read yes/no.
    starts = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in fields}
    assert len(starts) == 1, fields
    assert re.search(r"^fast_path: +no$", out, re.MULTILINE), out
    assert "True" not in out
    assert "False" not in out
    changes = _table(out.split("), page 1:\n")[1].split("\n\n")[0])
    # Failed first, then numeric ids by value; values as JSON spells them.
    assert [c["user_id"] for c in changes] == ["20", "1", "2", "10", "100"]
    assert {c["value"] for c in changes} == {"true"}
    # A raw newline, a markup-like id and a bidi override cannot break the table.
    rejected = out.split("Rejected rows (2), page 1:\n")[1].splitlines()
    assert len(rejected) == 3, rejected  # the header and one line per row
    assert "evil\\nid" in rejected[1] + rejected[2]
    assert "[/bold]" in rejected[1] + rejected[2]
    assert "\\u202e" in rejected[1] + rejected[2]

    with engine.begin() as connection:
        connection.execute(update(sync_runs).values(started_at=utcnow() - timedelta(days=2)))
    assert cli("prune", "--older-than", "1d")[0] == 0
    code, out, _ = cli("show", "1")
    assert code == 0
    # The failed change went (a failed change is not owed), as did the four delivered.
    assert "Changes (5 pruned), page 1:" in out
    assert "Rejected rows (2):\n  (they were pruned: `audience-sync prune` deleted them" in out
    shown = json.loads(cli("show", "1", "--json")[1])
    assert shown["pruned"] == {"changes": 5, "rejected_rows": 2}


def test_show_on_a_terminal_takes_values_as_text(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    write_members(
        workspace.add_file_audience("Order Completed Last 30days"),
        [1, ("[/]", "a@example.com"), ("x\ny", "b@example.com")],
    )
    cli("run")

    shown = run_on_terminal(["show", "1", "--config", str(workspace.config_path)], 120)

    assert_no_traceback(shown)
    assert "failed unexpectedly" not in shown
    assert "[/]" in shown
    assert "x\\ny" in shown


def test_show_paging_hint_keeps_the_config(workspace: Workspace, gist: FakeGist, cli: Any) -> None:
    write_members(workspace.add_file_audience("Order Completed Last 30days"), range(5))
    cli("run")

    code, out, _ = cli("show", "1", "--limit", "2")

    assert code == 0
    assert f"More: audience-sync show 1 --page 2 --limit 2 --config {workspace.config_path}" in out


# ---------------------------------------------------------------- logging


def test_quiet_prints_each_error_once(workspace: Workspace, gist: FakeGist, cli: Any) -> None:
    write_members(workspace.add_file_audience("Order Completed Last 30days"), [1, 2])
    write_members(workspace.add_file_audience("Newsletter Signups"), [3])
    gist.fail_after(0, 401)

    code, out, err = cli("run", "--quiet")

    assert (code, out) == (1, "")
    assert err.count("Gist refused the API key") == 1, err
    assert err.startswith(f"error: {KEY}, newsletter_signups: Gist refused the API key")


@pytest.mark.parametrize(
    "args", [["run", "--quiet"], ["run", "-v"], ["retire", KEY]], ids=["quiet", "verbose", "usage"]
)
def test_json_log_format_prints_only_json_lines(
    workspace: Workspace, gist: FakeGist, cli: Any, args: list[str]
) -> None:
    write_members(workspace.add_file_audience("Order Completed Last 30days"), [1, 2])
    gist.fail_after(0, 401)

    code, _, err = cli(*args, "--log-format", "json")

    assert code in (1, 2)
    lines = err.splitlines()
    assert lines
    records = [json.loads(line) for line in lines]  # every line, or this raises
    # Without --quiet a run's errors are part of its output (stdout); logs are on stderr.
    wanted = "info" if "-v" in args else "error"
    assert any(r["level"] == wanted for r in records), records
    assert API_KEY not in err


@pytest.mark.parametrize(
    "args",
    [["--log-format", "json", "run", "--bogus"], ["nope", "--log-format=json"]],
    ids=["unknown-flag", "unknown-command"],
)
def test_json_log_format_covers_usage_errors(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run_cli(args)
    _, err = capsys.readouterr()
    assert exited.value.code == 2
    [record] = [json.loads(line) for line in err.splitlines()]
    assert record["level"] == "error"
    assert re.match(r"audience-sync( run)?: ", record["message"]), record  # the command's own


def test_warnings_and_errors_share_one_style(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [1])
    write_members(workspace.add_file_audience("Newsletter Signups"), [2])
    assert cli("run")[0] == 0
    workspace.audiences.pop()  # Newsletter Signups is no longer configured: a warning
    workspace.write_config()
    gist.fail_user("u3", 422, "Nope")  # and a failed change: an error
    write_members(source, [1, 3])

    code, out, err = cli("run", "--quiet")

    assert (code, out) == (1, "")
    warning, error = err.splitlines()
    assert warning.startswith(
        "warning: audience 'newsletter_signups' is no longer configured but Gist may still "
        "hold 1 of its members: run `audience-sync retire newsletter_signups --config"
    )
    assert error.startswith(f"error: {KEY}: 1 change failed (first: user u3: HTTP 422: Nope)")


def test_a_removed_trait_is_warned_about_as_an_audience_is(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    write_members(workspace.add_file_audience("VIP"), [1])
    (workspace.root / "revenue.jsonl").write_text(
        "".join(
            json.dumps({"user_id": f"u{n}", "email": f"u{n}@example.com", "value": value}) + "\n"
            for n, value in ((1, 10.5), (2, None), (3, "gold"))
        )
    )
    workspace.traits.append({"name": "Revenue", "file": "revenue.jsonl"})
    workspace.write_config()
    assert cli("run")[0] == 0
    workspace.traits.clear()  # Revenue is removed; Gist holds 2 non-null values of it
    workspace.write_config()

    code, _, err = cli("run")

    assert code == 0
    retire = f"audience-sync retire revenue --config {workspace.config_path}"
    assert err == (
        "warning: trait 'revenue' is no longer configured but Gist may still hold a value of "
        f"it for 2 users: run `{retire}` to send them null and forget it\n"
    )
    assert cli("retire", "revenue")[0] == 0
    assert gist.properties("revenue") == {"u1": None, "u2": None, "u3": None}
    assert cli("run")[2] == ""  # retired: nothing more to say


@pytest.mark.slow
def test_every_line_of_the_daemon_says_when(
    workspace: Workspace, gist: FakeGist, engine: Engine
) -> None:
    write_members(workspace.add_file_audience("Order Completed Last 30days", every="1h"), [1])
    port = free_port()
    workspace.sections["daemon"] = {"metrics_port": port}
    workspace.write_config()
    daemon = subprocess.Popen(
        [EXECUTABLE, "daemon", "--config", str(workspace.config_path)],
        env={**os.environ, "GIST_API_KEY": API_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(gist.contacts()) < 1 or not _runs_finished(engine):
            assert time.monotonic() < deadline, "the daemon's first run did not finish"
            time.sleep(0.05)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)

    assert daemon.returncode == 0, err
    lines = err.splitlines()
    stamped = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (info|warning|error): ")
    assert all(stamped.match(line) for line in lines), err
    said = [stamped.sub("", line) for line in lines]
    assert f"serving /metrics and /healthz at http://127.0.0.1:{port}" in said, err
    assert any(line.startswith(f"run {KEY}: succeeded entered=1 ") for line in said), err
    assert "SIGTERM: stopping after the running sync (again to stop now)" in said, err


def _runs_finished(engine: Engine) -> bool:
    with engine.connect() as connection:
        statuses = list(connection.scalars(select(sync_runs.c.status)))
    return bool(statuses) and "running" not in statuses


def test_v_hides_library_chatter_and_vv_shows_request_bodies(
    tmp_path: Path,
    gist: FakeGist,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A new SQLite state: the first command migrates it, which Alembic likes to narrate.
    workspace = Workspace(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", gist.url)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [1])
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    cli = invoker(workspace, capsys)

    code, _, err = cli("run", "-v")
    assert code == 0
    assert f"info: {KEY}: 1 rows" in err
    for chatter in ("alembic", "Context impl", "httpx", "HTTP Request"):
        assert chatter not in err

    write_members(source, [1, ("u2", "two@example.com")])
    code, _, err = cli("run", "-vv")
    assert code == 0
    body = json.dumps(
        {"user_id": "u2", "email": "two@example.com", "custom_properties": {KEY: True}}
    )
    assert f"POST /contacts {body}" in err
    assert "HTTP Request: POST" in err
    assert API_KEY not in err


def test_logging_set_up_by_a_command_is_put_back(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    names = ("", "httpx", "alembic", "apscheduler", "psycopg", "audience_sync")
    before = {name: logging.getLogger(name).level for name in names}
    handlers = list(logging.getLogger().handlers)
    # Scheduled: a daemon with nothing scheduled is refused (exit 2).
    write_members(workspace.add_file_audience("Order Completed Last 30days", every="1h"), [1])

    assert cli("run", "-vv", "--log-format", "json")[0] == 0
    assert cli("daemon", "--once")[0] == 0

    assert {name: logging.getLogger(name).level for name in names} == before
    assert logging.getLogger().handlers == handlers


# ---------------------------------------------------------------- tables on a terminal


@pytest.mark.slow
@pytest.mark.parametrize("columns", [80, 120], ids=["80", "120"])
def test_tables_fit_the_terminal(
    workspace: Workspace, gist: FakeGist, cli: Any, columns: int
) -> None:
    write_members(workspace.add_file_audience("Order Completed Last 30days"), range(3))
    write_members(workspace.add_file_audience("Newsletter Signups"), [1, ("u9", "bad")])
    cli("run")
    config = ["--config", str(workspace.config_path)]

    for args in (["history"], ["run", "--dry-run"], ["audiences"], ["show", "2"]):
        shown = run_on_terminal([*args, *config], columns)
        assert_no_traceback(shown)
        lines = shown.splitlines()
        # Tables fit; a sentence under them (a hint naming a path) may wrap like any text.
        too_wide = [line for line in lines if len(line) > columns and "`audience-sync" not in line]
        assert not too_wide, "\n".join(too_wide)
        if args[0] in ("history", "run", "audiences"):
            # Keys are never broken over lines.
            assert any(KEY in line for line in lines), shown
            assert any("newsletter_signups" in line for line in lines), shown
    history = run_on_terminal(["history", *config], columns)
    assert SHORT_TIME.search(history), history
    assert "T" not in "".join(re.findall(r"\d{4}-\d\d-\d\dT", history))
    if columns == 120:
        assert "delivered" in history  # room for the counts
    else:
        assert "hidden to fit" in history


@pytest.mark.slow
def test_ctrl_c_mid_run_keeps_the_progress_bars_whole(
    workspace: Workspace, gist: FakeGist, engine: Engine
) -> None:
    write_members(workspace.add_file_audience("Order Completed Last 30days"), range(400))
    workspace.gist_options["max_concurrency"] = 2
    workspace.write_config()
    gist.latency = 0.05  # 400 requests two at a time: ten seconds, if nothing stops them
    master, slave = os.openpty()
    termios.tcsetwinsize(slave, (40, 120))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(
        [EXECUTABLE, "run", "--config", str(workspace.config_path)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**env, "GIST_API_KEY": API_KEY, "TERM": "xterm-256color"},
    )
    os.close(slave)
    shown = b""
    try:
        while b"send changes" not in shown or len(gist.requests("/contacts")) < 20:
            shown += _read_some(master)
        process.send_signal(signal.SIGINT)
        while chunk := _read_some(master):
            shown += chunk
    finally:
        process.wait(timeout=60)
        os.close(master)

    assert process.returncode == 1  # the run was interrupted, gracefully
    # What the terminal was sent, colours and cursor moves removed; a carriage return
    # starts a line again, as on the screen.
    lines = ANSI.sub("", shown.decode()).replace("\r\n", "\n").splitlines()
    notice = [line for line in lines if "SIGINT" in line]
    assert notice, lines
    # The notice is a line of its own above the bars, never written into one of them.
    assert all(line.startswith("warning: SIGINT: finishing requests") for line in notice), notice
    assert_no_traceback("\n".join(lines))
    bars = [line for line in lines if line.startswith("send changes")]
    assert all("elapsed" in bar and "eta" in bar for bar in bars), bars[-1]


def _read_some(fd: int) -> bytes:
    """What the terminal got next (b"" once the process closed it); fails after 30 s."""
    with selectors.DefaultSelector() as waiting:
        waiting.register(fd, selectors.EVENT_READ)
        assert waiting.select(30), "the command printed nothing for 30 s"
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the process closed the terminal
        return b""


def test_a_dry_run_records_the_requests_it_would_send(
    workspace: Workspace, engine: Engine, gist: FakeGist, cli: Any
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days", send_track=True)
    write_members(source, [1, 2])

    code, out, _ = cli("run", "--dry-run", "--json")

    assert code == 0
    [result] = json.loads(out)
    assert (result["kind"], result["status"], result["entered"]) == ("dry-run", "succeeded", 2)
    assert gist.requests() == []
    code, out, _ = cli("show", str(result["run_id"]), "--json")
    shown = json.loads(out)
    assert shown["changes_by_status"] == {"planned": 2}
    assert {(c["user_id"], c["email"], c["value"], c["event"]) for c in shown["changes"]} == {
        ("u1", "u1@example.com", True, "planned"),
        ("u2", "u2@example.com", True, "planned"),
    }
    code, out, _ = cli("run", "--json")  # the next real run plans afresh
    [real] = json.loads(out)
    assert (real["entered"], real["delivered"]) == (2, 2)
    assert len(gist.requests("/contacts")) == 2


def test_dry_runs_are_recorded_as_the_mode_they_rehearse(
    workspace: Workspace, engine: Engine, gist: FakeGist, cli: Any
) -> None:
    write_members(workspace.add_file_audience("VIP"), [1, 2])
    assert cli("run")[0] == 0
    started = load_last_starts(engine)["vip"]

    code, out, _ = cli("backfill", "vip", "--dry-run", "--json")
    assert (code, [r["kind"] for r in json.loads(out)]) == (0, ["backfill-dry-run"])
    workspace.audiences.clear()
    write_members(workspace.add_file_audience("Other"), [1])
    code, out, _ = cli("retire", "vip", "--dry-run", "--json")
    assert (code, [r["kind"] for r in json.loads(out)]) == (0, ["retire-dry-run"])

    kinds = [r["kind"] for r in json.loads(cli("history", "--json")[1])]
    assert kinds == ["retire-dry-run", "backfill-dry-run", "run"]
    assert len(gist.requests("/contacts")) == 2  # the first run's, and no more
    assert load_last_starts(engine)["vip"] == started  # rehearsals are not runs to schedule by
    _, out, _ = cli("prune", "--older-than", "0d", "--json", "--dry-run")
    assert json.loads(out)["dry_run"] is True
    _, out, _ = cli("prune", "--older-than", "0d", "--json")
    assert json.loads(out)["dry_run"] is False


@pytest.mark.parametrize("command", ["backfill", "retire"], ids=str)
def test_backfill_and_retire_help_say_what_a_trait_is_sent(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        run_cli([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "true for an audience" in text or "false for an audience" in text
    assert ("null for a trait" if command == "retire" else "the computed value for a trait") in text


def test_an_email_two_audiences_disagree_on_is_reported(
    workspace: Workspace, engine: Engine, gist: FakeGist, cli: Any
) -> None:
    first = workspace.add_file_audience("VIP")
    second = workspace.add_file_audience("Newsletter")
    write_members(first, [("u1", "one@example.com")])
    write_members(second, [("u1", "two@example.com")])

    code, out, _ = cli("run")

    assert code == 0
    assert (
        "newsletter: 1 user with another email in an earlier audience's source, whose email "
        "was sent (first: user u1: two@example.com here, one@example.com sent)"
    ) in out
    run_id = json.loads(cli("history", "--json")[1])[0]["run_id"]
    code, out, _ = cli("show", str(run_id))
    assert "Emails that differed from an earlier audience's (1)" in out
    assert "two@example.com" in out
    assert "one@example.com" in out
