"""``check``: config, state, each source and Gist's key, each checked the way a sync would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from audience_sync.check import run_checks
from audience_sync.fakegist import FakeGist
from tests.conftest import API_KEY, Workspace, write_members


def checked(workspace: Workspace, key: str = API_KEY) -> dict[str, tuple[bool, str]]:
    return {
        c.name: (c.ok, c.detail) for c in run_checks(workspace.config_path, {"GIST_API_KEY": key})
    }


def test_a_working_setup_passes_every_check(
    workspace: Workspace, engine: Engine, gist: FakeGist, tmp_path: Path
) -> None:
    write_members(workspace.add_file_audience("VIP"), range(3))
    warehouse = tmp_path / "warehouse.db"
    import sqlite3

    with sqlite3.connect(warehouse) as connection:
        connection.execute("CREATE TABLE t (user_id, email)")
    connection.close()
    workspace.add_sql_audience("Empty", f"sqlite:///{warehouse}", "SELECT user_id, email FROM t")

    result = checked(workspace)

    assert list(result) == ["config", "state", "source vip", "source empty", "gist"]
    assert all(ok for ok, _ in result.values()), result
    assert "a first row" in result["source vip"][1]
    assert "no rows" in result["source empty"][1]
    assert [r.path for r in gist.requests()] == ["/contacts"]  # one read, nothing written


def test_a_wrong_key_is_known_in_one_request(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    write_members(workspace.add_file_audience("VIP"), range(3))

    ok, detail = checked(workspace, key="wrong")["gist"]

    assert not ok
    assert "refused the API key" in detail
    assert len(gist.requests()) == 1  # no retries
    assert "wrong" not in detail


def test_each_broken_part_is_named(workspace: Workspace, gist: FakeGist) -> None:
    workspace.add_file_audience("VIP", file="missing.jsonl")
    workspace.add_sql_audience("Broken", "sqlite:///nowhere/at/all.db", "SELECT 1")
    workspace.gist_url = "http://127.0.0.1:9"  # nothing listens there
    workspace.write_config()

    result = checked(workspace)

    assert result["config"][0]
    assert not result["source vip"][0]
    assert "missing.jsonl: file not found" in result["source vip"][1]
    assert not result["source broken"][0]
    assert not result["gist"][0]
    assert "cannot reach Gist" in result["gist"][1] or "connection" in result["gist"][1]


def test_a_config_that_cannot_load_is_the_only_check(workspace: Workspace) -> None:
    workspace.config_path.write_text("[gist\n")

    [config] = run_checks(workspace.config_path, {})

    assert (config.name, config.ok) == ("config", False)
    assert "invalid TOML" in config.detail


def test_the_check_command_prints_a_checklist_and_says_what_failed(
    workspace: Workspace, engine: Engine, gist: FakeGist, cli: Any
) -> None:
    write_members(workspace.add_file_audience("VIP"), range(3))

    code, out, _ = cli("check")

    assert code == 0
    assert out.splitlines()[-1] == "all 4 checks passed"
    assert "ok   gist: " in out
    gist.fail_after(0, 401)
    code, out, _ = cli("check", "--json")
    assert code == 1
    assert [c["name"] for c in json.loads(out) if not c["ok"]] == ["gist"]
