"""The command line: exit codes, JSON output, the quick start, and secrets kept out of sight."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, select

from audience_sync import db, lease
from audience_sync.cli import run_cli
from audience_sync.fakegist import FakeGist
from tests.conftest import API_KEY, Workspace, invoker, write_members

ROOT = Path(__file__).resolve().parent.parent
KEY = "order_completed_last_30days"


def test_quick_start_dry_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(ROOT / "config.example.toml", tmp_path / "config.example.toml")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.setenv("GIST_API_KEY", "placeholder")

    code = run_cli(["run", "--config", str(tmp_path / "config.example.toml"), "--dry-run"])

    out = capsys.readouterr().out
    assert code == 0
    assert "nothing was sent" in out
    for word in ("members", "entered", "exited", "rejected", KEY, "newsletter_signups"):
        assert word in out
    assert (tmp_path / "audience_sync.db").exists()  # relative to the config file


def test_run_history_show(workspace: Workspace, gist: FakeGist, cli: Any) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [1, 2, ("u3", "bad")])

    code, out, _ = cli("run")
    assert code == 0
    assert "succeeded" in out

    code, out, _ = cli("history", "--json")
    assert code == 0
    [run] = json.loads(out)
    expected = {"run_id", "audience_key", "kind", "status", "started_at", "finished_at", "members",
                "entered", "exited", "delivered", "failed", "rejected"}  # fmt: skip
    assert expected <= set(run)
    assert (run["audience_key"], run["status"], run["delivered"], run["rejected"]) == (
        KEY, "succeeded", 2, 1,
    )  # fmt: skip

    code, out, _ = cli("show", str(run["run_id"]), "--json")
    shown = json.loads(out)
    assert {c["user_id"] for c in shown["changes"]} == {"u1", "u2"}
    assert shown["rejected_rows"][0]["reason"] == "invalid email"

    code, out, _ = cli("show", str(run["run_id"]))
    assert code == 0
    assert "invalid email" in out

    code, _, err = cli("show", "999")
    assert code == 2
    assert "no run with id 999" in err


def test_history_filters_and_limit(workspace: Workspace, gist: FakeGist, cli: Any) -> None:
    a = workspace.add_file_audience("Order Completed Last 30days")
    b = workspace.add_file_audience("Newsletter Signups")
    write_members(a, [1])
    write_members(b, [1])
    cli("run")
    cli("run")
    _, out, _ = cli("history", "--json", "--audience", "newsletter_signups")
    runs = json.loads(out)
    assert [r["audience_key"] for r in runs] == ["newsletter_signups"] * 2
    assert runs[0]["run_id"] > runs[1]["run_id"]  # newest first
    _, out, _ = cli("history", "--json", "--limit", "1")
    assert len(json.loads(out)) == 1


def test_audiences_lists_names_as_configured(workspace: Workspace, cli: Any) -> None:
    workspace.add_file_audience("Order Completed Last 30days")
    workspace.add_file_audience("VIP — Café", key="vip_cafe")
    code, out, _ = cli("audiences", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [(a["name"], a["key"]) for a in listed] == [
        ("Order Completed Last 30days", KEY),
        ("VIP — Café", "vip_cafe"),
    ]
    assert all(a["source"].endswith(".jsonl") for a in listed)


def test_missing_env_var_is_a_config_error(
    workspace: Workspace, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace.add_file_audience("Order Completed Last 30days")
    monkeypatch.delenv("GIST_API_KEY")
    code, _, err = cli("run", "--dry-run")
    assert code == 2
    assert "GIST_API_KEY" in err
    assert str(workspace.config_path) in err


def test_config_from_environment(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace.add_file_audience("Order Completed Last 30days")
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    monkeypatch.setenv("AUDIENCE_SYNC_CONFIG", str(workspace.config_path))
    assert run_cli(["audiences"]) == 0
    assert KEY in capsys.readouterr().out
    monkeypatch.delenv("AUDIENCE_SYNC_CONFIG")
    monkeypatch.chdir(workspace.root)  # ./audience_sync.toml
    assert run_cli(["audiences"]) == 0


def test_exit_codes(workspace: Workspace, engine: Engine, gist: FakeGist, cli: Any) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(120))
    assert cli("run")[0] == 0

    write_members(source, range(10))
    code, out, _ = cli("run")
    assert code == 1
    assert "guarded" in out

    lease.acquire(engine, KEY, "elsewhere:1:x")
    code, out, _ = cli("run")
    assert code == 3
    assert "skipped" in out

    code, _, err = cli("run", "--audience", "nope")
    assert code == 2
    assert "nope" in err


def test_secrets_never_reach_output_logs_or_tables(
    workspace: Workspace,
    engine: Engine,
    gist: FakeGist,
    cli: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(5))
    gist.fail_user("u1", 422)
    gist.fail_next(1, 503)
    caplog.set_level(logging.DEBUG)

    outputs = [cli("run", "-vv")]
    outputs.append(cli("history"))
    outputs.append(cli("show", "1", "--json"))
    gist.fail_after(0, 401)
    write_members(source, range(8))
    outputs.append(cli("run", "--json", "-v"))

    text = "".join(out + err for _, out, err in outputs) + caplog.text
    assert API_KEY not in text
    assert "Gist refused the API key" in text
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.connect() as connection:
        for table in metadata.tables.values():
            for row in connection.execute(select(table)):
                assert API_KEY not in repr(row), table.name


def test_state_store_behind_is_refused_until_db_upgrade(
    workspace: Workspace,
    gist: FakeGist,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    cli = invoker(workspace, capsys)
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, [1])
    if workspace.state_url.startswith("sqlite"):
        assert cli("run")[0] == 0  # the embedded store migrates itself
        return
    # PostgreSQL here trusts local connections, so a password can be shown to stay hidden.
    workspace.state_url = workspace.state_url.replace("@", ":pw-s3cret@", 1)
    workspace.write_config()
    code, out, err = cli("run")
    assert code == 2
    assert "audience-sync db upgrade" in err
    code, out2, err2 = cli("db", "upgrade")
    assert code == 0
    assert f"migrated empty → {db.head_revision()}" in out2
    assert "***" in out2
    assert cli("run")[0] == 0
    assert "pw-s3cret" not in out + err + out2 + err2


def test_console_script_and_module_entry_points() -> None:
    for command in (["audience-sync", "--help"], [sys.executable, "-m", "audience_sync", "--help"]):
        if command[0] == "audience-sync":
            command[0] = str(Path(sys.executable).with_name("audience-sync"))
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert "history" in done.stdout


def test_vv_logs_each_body_sent_and_less_verbose_runs_do_not(
    workspace: Workspace, gist: FakeGist, cli: Any, caplog: pytest.LogCaptureFixture
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(2))
    cli("run", "-v")
    assert '"user_id": "u0"' not in caplog.text  # -v logs no bodies
    write_members(source, range(3))
    cli("run", "-vv")
    assert 'POST /contacts {"user_id": "u2"' in caplog.text
