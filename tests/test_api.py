"""``audience_sync.run``: the Python API orchestrators call, the same engine as the CLI."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest
from sqlalchemy import Engine

import audience_sync
from audience_sync.errors import ConfigError
from audience_sync.fakegist import FakeGist
from tests.conftest import API_KEY, Workspace, write_members
from tests.helpers import acknowledged, in_gist, users

ENV = {"GIST_API_KEY": API_KEY}


def test_run_syncs_and_returns_each_audiences_result(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(3))
    workspace.add_file_audience("Broken", file="missing.jsonl")
    (workspace.root / "missing.jsonl").write_text('{"user_id": "x"}\n')  # no email

    results = audience_sync.run(workspace.config_path, environ=ENV)

    by_key = {r.audience_key: r for r in results}
    vip = by_key["order_completed_last_30days"]
    assert (vip.status, vip.entered, vip.delivered) == ("succeeded", 3, 3)
    assert by_key["broken"].status == "failed"
    assert "rejected" in (by_key["broken"].error or "")
    assert audience_sync.exit_code(results) == 1
    assert in_gist(gist) == acknowledged(engine) == users(0, 1, 2)

    again = audience_sync.run(
        workspace.config_path, ["order_completed_last_30days"], dry_run=True, environ=ENV
    )
    assert [(r.kind, r.status, r.entered) for r in again] == [("dry-run", "succeeded", 0)]
    assert audience_sync.exit_code(again) == 0


def test_one_key_as_a_string_is_one_key_and_a_retire_of_nothing_is_refused(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(2))
    workspace.add_file_audience("Other")

    [result] = audience_sync.run(workspace.config_path, "order_completed_last_30days", environ=ENV)

    assert (result.audience_key, result.delivered) == ("order_completed_last_30days", 2)
    with pytest.raises(ValueError, match="retire needs the keys to retire"):
        audience_sync.run(workspace.config_path, mode="retire", environ=ENV)
    with pytest.raises(TypeError, match="audience keys must be strings"):
        audience_sync.run(workspace.config_path, [b"vip"], environ=ENV)  # type: ignore[list-item]
    # The same key twice is one run of it.
    results = audience_sync.run(workspace.config_path, ["other", "other"], environ=ENV)
    assert [r.audience_key for r in results] == ["other"]


def test_run_finds_the_config_as_the_cli_does(
    workspace: Workspace,
    engine: Engine,
    gist: FakeGist,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    write_members(workspace.add_file_audience("VIP"), range(2))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError, match="config file not found"):
        audience_sync.run(environ=ENV)
    results = audience_sync.run(environ={**ENV, "AUDIENCE_SYNC_CONFIG": str(workspace.config_path)})
    assert [r.status for r in results] == ["succeeded"]


RECIPES = Path(__file__).parent.parent / "examples" / "orchestrators"


@pytest.mark.parametrize("example", ["airflow_dag.py", "dagster_asset.py"])
def test_orchestrator_recipes_use_only_what_the_api_has(example: str) -> None:
    """Every ``audience_sync.X`` a recipe calls and every result field it reads exist (the
    recipes run in their orchestrators in tests/orchestrators/, in environments of their own)."""
    path = RECIPES / example
    tree = ast.parse(path.read_text(), str(path))
    called = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "audience_sync"
    }
    read = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id == "r"
    }  # fmt: skip
    assert {"run", "failure_kind", "is_retriable"} <= called <= set(audience_sync.__all__)
    assert {"audience_key", "status", "failure", "error"} <= read
    assert read <= {f.name for f in fields(audience_sync.RunResult)}


def test_the_separate_environment_recipe_reads_what_run_json_prints() -> None:
    """That recipe cannot import audience_sync: its copy of the retriable kinds and the
    ``run --json`` fields it reads must match the package's."""
    path = RECIPES / "airflow_separate_env.py"
    tree = ast.parse(path.read_text(), str(path))
    constants = {
        target.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    retriable = ast.literal_eval(constants["RETRIABLE"].args[0])  # type: ignore[attr-defined]
    assert retriable == set(audience_sync.RETRIABLE_FAILURES)
    summary = set(ast.literal_eval(constants["SUMMARY"]))
    printed = {"audience"} | {f.name for f in fields(audience_sync.RunResult)}
    assert summary <= printed


def test_the_documented_errors_and_failure_kinds_are_importable_from_the_package() -> None:
    from audience_sync.errors import AudienceSyncError, ConfigError, StateError

    assert audience_sync.ConfigError is ConfigError
    assert audience_sync.StateError is StateError
    assert audience_sync.AudienceSyncError is AudienceSyncError
    assert audience_sync.failure_kind(ConfigError("x")) == "config"
    assert audience_sync.is_retriable(audience_sync.failure_kind(StateError("x")))


def test_audiences_lists_the_configured_keys_without_gist_or_state(
    workspace: Workspace, gist: FakeGist
) -> None:
    workspace.add_file_audience("Order Completed Last 30days")
    workspace.add_file_audience("VIP", key="vip_customers")

    # No GIST_API_KEY, and the state database was never created.
    found = audience_sync.audiences(workspace.config_path, environ={})

    assert found == {
        "order_completed_last_30days": "Order Completed Last 30days",
        "vip_customers": "VIP",
    }
    assert not Path(workspace.state_url.removeprefix("sqlite:///")).exists()
    with pytest.raises(ConfigError, match="config file not found"):
        audience_sync.audiences(workspace.root / "missing.toml", environ={})
