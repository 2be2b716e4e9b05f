"""What a newcomer's mistakes and bad luck look like on the command line: one line naming
what failed and an exit code, never a traceback (issue 11)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from audience_sync.cli import run_cli
from audience_sync.fakegist import FakeGist
from tests.conftest import (
    API_KEY,
    EXECUTABLE,
    Workspace,
    assert_no_traceback,
    closed_port,
    invoker,
    run_process,
    write_members,
)

KEY = "order_completed_last_30days"


def _json(out: str) -> Any:
    return json.loads(out)


# ---------------------------------------------------------------- tracebacks


@pytest.mark.parametrize(
    "command", [["run"], ["history"], ["db", "upgrade"]], ids=["run", "history", "db-upgrade"]
)
def test_postgresql_state_without_its_driver_names_the_extra(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    (tmp_path / "members.csv").write_text("user_id,email\n1,a@example.com\n")
    config = tmp_path / "audience_sync.toml"
    config.write_text(
        '[state]\nurl = "postgresql://sync:pw-s3cret@127.0.0.1/state"\n'
        '[gist]\napi_key = "${GIST_API_KEY}"\n'
        '[[audiences]]\nname = "Buyers"\nfile = "members.csv"\n'
    )
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    # As on a machine where `pip install audience-sync` left psycopg out.
    monkeypatch.setitem(sys.modules, "psycopg", None)

    code = run_cli([*command, "--config", str(config)])

    _, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1, err
    assert "state.url postgresql+psycopg://sync:***@127.0.0.1/state" in err
    assert "pip install 'audience-sync[postgres]'" in err
    assert "pw-s3cret" not in err


def test_sql_source_without_its_driver_fails_only_that_audience(
    tmp_path: Path,
    gist: FakeGist,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # SQLite state: the missing driver is the warehouse's alone.
    workspace = Workspace(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", gist.url)
    cli = invoker(workspace, capsys)
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    write_members(workspace.add_file_audience("Newsletter Signups"), [1])
    workspace.add_sql_audience(
        "Order Completed Last 30days", "postgresql://reader@127.0.0.1/warehouse", "SELECT 1"
    )
    monkeypatch.setitem(sys.modules, "psycopg", None)

    code, out, _ = cli("run", "--json")

    assert code == 1
    by_key = {r["audience_key"]: r for r in _json(out)}
    assert by_key["newsletter_signups"]["status"] == "succeeded"
    assert by_key[KEY]["status"] == "failed"
    assert "pip install 'audience-sync[postgres]'" in by_key[KEY]["error"]


def test_an_unexpected_error_is_one_line_naming_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = run_cli(["init", "/dev/null/starter"])  # a folder below a device: cannot exist

    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err.count("\n") == 1, err
    assert err.startswith("error: `init` failed unexpectedly: NotADirectoryError")
    assert "/dev/null/starter" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "args", [["demo"], ["show", "1", "--json"], ["run", "--json"]], ids=["demo", "show", "run"]
)
def test_a_reader_that_leaves_early_is_no_error(
    workspace: Workspace, engine: Engine, gist: FakeGist, args: list[str]
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(300))  # `show --json` then prints far more than a pipe holds
    env = {"GIST_API_KEY": API_KEY}
    config = ["--config", str(workspace.config_path)]
    if args[0] == "show":
        assert run_process("run", *config, env=env).returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head` does once it has its lines
    try:
        done = run_process(*args, *([] if args == ["demo"] else config), env=env, stdout=write_end)
    finally:
        os.close(write_end)

    assert done.returncode == 0, done.stderr
    assert_no_traceback(done.stderr)
    if args[0] == "run":
        assert len(gist.contacts()) == 300  # the sync itself was not cut short


@pytest.mark.parametrize(
    "command", [[EXECUTABLE], [sys.executable, "-m", "audience_sync"]], ids=["script", "module"]
)
def test_no_arguments_prints_the_commands_and_exits_2(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)

    assert (done.returncode, done.stdout) == (2, "")
    assert_no_traceback(done.stderr)
    assert done.stderr.startswith("usage: audience-sync")
    assert "    run " in done.stderr  # the commands are listed, not only the usage line
    assert done.stderr.endswith("audience-sync: error: no command given\n")


@pytest.mark.slow
def test_ctrl_c_while_starting_up_exits_130_quietly() -> None:
    # The first second of `demo` is mostly imports, then the fake Gist starts and syncs.
    # (A signal in the interpreter's own first ~20 ms, before any of our code, is Python's.)
    for delay in (0.15, 0.3, 0.45, 0.6, 0.75, 0.9):
        process = subprocess.Popen(
            [sys.executable, "-m", "audience_sync", "demo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)

        assert_no_traceback(err)
        assert "KeyboardInterrupt" not in err, (delay, err)
        assert process.returncode == 130, (delay, process.returncode, err)


# ---------------------------------------------------------------- a newcomer's config and flags


def test_history_of_an_unknown_audience_names_the_known_ones(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    write_members(workspace.add_file_audience("VIP"), [1])
    write_members(workspace.add_file_audience("Churned"), [2])
    assert cli("run")[0] == 0
    workspace.audiences.pop()  # churned: in the history, no longer configured
    workspace.write_config()

    code, out, err = cli("history", "--audience", "churn")

    assert (code, out) == (2, "")
    assert err == (
        "error: history --audience churn: no audience or trait with that key (configured: "
        "vip; no longer configured: churned)\n"
    )
    code, out, _ = cli("history", "--audience", "churned", "--json")
    assert (code, [r["audience_key"] for r in _json(out)]) == (0, ["churned"])


def test_a_config_file_with_a_byte_order_mark_is_read(
    workspace: Workspace, engine: Engine, cli: Any
) -> None:
    write_members(workspace.add_file_audience("VIP"), [1])
    workspace.config_path.write_bytes(b"\xef\xbb\xbf" + workspace.config_path.read_bytes())

    code, out, err = cli("audiences")

    assert (code, err) == (0, "")
    assert "vip" in out


def test_an_api_key_written_in_the_file_works_with_a_warning(
    workspace: Workspace, gist: FakeGist, engine: Engine, cli: Any
) -> None:
    write_members(workspace.add_file_audience("VIP"), [1])
    config = workspace.config_path
    config.write_text(config.read_text().replace("${GIST_API_KEY}", API_KEY))

    code, _, err = cli("run")

    assert code == 0
    assert err == (
        f"warning: {config}: gist.api_key is written in the file; set "
        'api_key = "${GIST_API_KEY}" and export the key instead, so it stays out of backups '
        "and version control\n"
    )
    assert API_KEY not in err
    assert set(gist.contacts()) == {"u1"}
    assert cli("history")[2] == ""  # a command that never reads the key says nothing of it


def test_a_missing_state_folder_names_the_config_file(
    tmp_path: Path,
    gist: FakeGist,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "nowhere"
    workspace = Workspace(tmp_path, f"sqlite:///{folder / 'state.db'}", gist.url)
    write_members(workspace.add_file_audience("VIP"), [1])
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    cli = invoker(workspace, capsys)

    for command in (["run"], ["db", "upgrade"], ["history"]):
        code, out, err = cli(*command)
        assert (code, out) == (2, ""), command
        assert err.startswith(
            f"error: {workspace.config_path}: state.url: folder {folder} does not exist"
        ), err


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (["init", "--json"], "init"),
        (["show", "1", "2"], "show"),
        (["db", "upgrade", "-x"], "db upgrade"),
    ],
    ids=["init-json", "show-extra", "db-upgrade"],
)
def test_an_unknown_word_shows_the_commands_own_usage(
    args: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run_cli(args)

    _, err = capsys.readouterr()
    assert exited.value.code == 2
    assert err.startswith(f"usage: audience-sync {usage} ")
    assert f"audience-sync {usage}: error: unrecognized arguments: {args[-1]}" in err


# ---------------------------------------------------------------- Gist unreachable


def test_connection_refused_names_the_url_and_the_cause_once(
    workspace: Workspace,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    workspace.gist_url = url
    write_members(workspace.add_file_audience("Order Completed Last 30days"), [1, 2])
    write_members(workspace.add_file_audience("Newsletter Signups"), [3])
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    cli = invoker(workspace, capsys)

    code, out, err = cli("run")
    assert code == 1
    said = f"cannot reach Gist at {url}: connection refused"
    assert (out + err).count(said) == 1, out + err
    assert f"{KEY}, newsletter_signups: Gist unavailable after 4 attempts: {said}" in out

    code, out, err = cli("run", "--quiet")
    assert code == 1
    assert out == ""
    assert err.count(said) == 1, err


def test_a_wrong_scheme_is_not_retried(workspace: Workspace, gist: FakeGist, cli: Any) -> None:
    https = gist.url.replace("http://", "https://")
    workspace.gist_url = https
    workspace.gist_options["retry_backoff_seconds"] = 5.0  # one retry would take 5 s
    write_members(workspace.add_file_audience("Order Completed Last 30days"), [1, 2])

    started = time.monotonic()
    code, out, err = cli("run", "--json")
    elapsed = time.monotonic() - started
    assert_no_traceback(err)

    assert code == 1
    [result] = _json(out)
    assert result["status"] == "failed"
    assert result["error"].startswith(f"cannot reach Gist at {https}: TLS failed")
    assert "check base_url's scheme" in result["error"]
    assert elapsed < 5.0


# ---------------------------------------------------------------- broken sources


def test_a_missing_source_file_fails_only_its_audience(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    missing = workspace.add_file_audience("Order Completed Last 30days")
    write_members(workspace.add_file_audience("Newsletter Signups"), [1])
    missing.unlink()

    code, out, _ = cli("run", "--json")

    assert code == 1
    by_key = {r["audience_key"]: r for r in _json(out)}
    assert by_key["newsletter_signups"]["status"] == "succeeded"
    assert (by_key[KEY]["status"], by_key[KEY]["error"]) == ("failed", f"{missing}: file not found")
    assert set(gist.contacts()) == {"u1"}


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM users RETURNING user_id, email",
        "-- clean up first\nUPDATE users SET email = 'x@example.com' RETURNING user_id, email",
    ],
    ids=["delete-returning", "commented-update"],
)
def test_a_writing_query_is_told_to_be_read_only(
    workspace: Workspace, engine: Engine, gist: FakeGist, cli: Any, query: str
) -> None:
    # The warehouse is the state database itself here: SQLite, or PostgreSQL with the
    # PostgreSQL-backed run of this test.
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE users (user_id TEXT, email TEXT)"))
        connection.execute(text("INSERT INTO users VALUES ('1', 'a@example.com')"))
    workspace.add_sql_audience("Order Completed Last 30days", workspace.state_url, query)

    code, out, _ = cli("run", "--json")

    assert code == 1
    [result] = _json(out)
    assert result["status"] == "failed"
    assert "the query must be read-only" in result["error"]
    assert "syntax error" not in result["error"]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT email FROM users")).scalar() == "a@example.com"


def test_blank_csv_lines_are_skipped_not_rejected(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    (workspace.root / "members.csv").write_text(
        "user_id,email\n1,a@example.com\n\n2,b@example.com\n  \n,,\n3,not-an-email\n\n"
    )
    workspace.audiences.append({"name": "Order Completed Last 30days", "file": "members.csv"})
    workspace.write_config()

    code, out, _ = cli("run", "--json")
    [result] = _json(out)
    assert (code, result["members"], result["rejected"]) == (0, 2, 1)

    _, shown, _ = cli("show", str(result["run_id"]), "--json")
    [rejected] = _json(shown)["rejected_rows"]
    assert (rejected["row_number"], rejected["reason"]) == (3, "invalid email")


# ---------------------------------------------------------------- retire


def test_retire_refuses_a_key_the_state_never_knew(
    workspace: Workspace, gist: FakeGist, cli: Any
) -> None:
    write_members(workspace.add_file_audience("Order Completed Last 30days"), [1])
    assert cli("run")[0] == 0
    workspace.audiences.clear()
    write_members(workspace.add_file_audience("Newsletter Signups"), [1])

    code, out, err = cli("retire", "never_existed")

    assert code == 2
    assert out == ""
    assert "never_existed: no such audience in the state" in err
    assert f"(retirable: {KEY})" in err
    _, history, _ = cli("history", "--json")
    assert [r["kind"] for r in _json(history)] == ["run"]  # no retire run was recorded


# ---------------------------------------------------------------- the state boundary


def test_a_state_database_error_is_one_line_without_sql_or_emails(
    workspace: Workspace, engine: Engine, gist: FakeGist, cli: Any
) -> None:
    write_members(workspace.add_file_audience("Order Completed Last 30days"), [1, 2])
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.execute(
                text(
                    "CREATE TRIGGER boom BEFORE INSERT ON memberships "
                    "BEGIN SELECT RAISE(ABORT, 'memberships are frozen'); END"
                )
            )
        else:
            connection.execute(
                text(
                    "CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN "
                    "RAISE EXCEPTION 'memberships are frozen'; END $$ LANGUAGE plpgsql"
                )
            )
            connection.execute(
                text(
                    "CREATE TRIGGER boom BEFORE INSERT ON memberships "
                    "FOR EACH ROW EXECUTE FUNCTION boom()"
                )
            )

    code, out, err = cli("run")

    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert err.startswith("error: state database ")
    assert "memberships are frozen" in err
    for leak in ("[SQL", "INSERT", "u1@example.com", "parameters"):
        assert leak not in err, err
