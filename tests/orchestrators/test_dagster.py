"""The Dagster recipe, loaded and materialised by Dagster itself against the fake Gist: one
asset per audience with its counts, a second run sending nothing, a refused key failing at
once without a retry (and Gist down retried), a held or refused audience left
unmaterialised while the others are, the tool's log lines in the event log."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import Engine

from audience_sync.fakegist import FakeGist
from tests.conftest import API_KEY, Workspace
from tests.helpers import acknowledged, users
from tests.orchestrators.conftest import (
    CHURN,
    HOLDER,
    RECIPES,
    VIP,
    assert_synced,
    hold,
    skip_reason,
)

if importlib.util.find_spec("dagster") is None:
    pytest.skip(skip_reason("Dagster", ".venv-dagster"), allow_module_level=True)

import dagster as dg

# Dagster's own deprecations and preview warnings are its business, not this test's.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

RECIPE = RECIPES / "dagster_asset.py"
RETRY = ("STEP_UP_FOR_RETRY", "STEP_RESTARTED")


@pytest.fixture
def recipe(site: Workspace, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The recipe's module loaded with the site's config and key. Its retry policy is made
    one retry without delay (not 3 after 5 minutes), so that whether it retries shows."""
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    real = dg.RetryPolicy

    def quick(**_: Any) -> dg.RetryPolicy:
        return real(max_retries=1, delay=0)

    monkeypatch.setattr(dg, "RetryPolicy", quick)
    spec = importlib.util.spec_from_file_location("dagster_recipe", RECIPE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def materialize(recipe: Any) -> tuple[Any, list[Any]]:
    """Materialise every asset of the recipe's definitions (with its resources) on a
    throw-away instance; the result and the run's event log."""
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [recipe.gist_audiences],
            resources=recipe.defs.resources,
            instance=instance,
            raise_on_error=False,
        )
        return result, list(instance.all_logs(result.run_id))


def materialized(result: Any) -> dict[str, dict[str, Any]]:
    """Each materialised asset's metadata, as plain values."""
    return {
        event.asset_key.to_user_string(): {
            k: v.value for k, v in event.materialization.metadata.items()
        }
        for event in result.get_asset_materialization_events()
    }


def kinds(log: list[Any]) -> set[str]:
    return {e.dagster_event.event_type_value for e in log if e.dagster_event is not None}


def messages(log: list[Any]) -> str:
    return "\n".join(e.user_message for e in log)


def failure(result: Any) -> str:
    [step] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    data = step.event_specific_data.user_failure_data
    return str(data.description if data is not None else step.event_specific_data.error.message)


def test_each_audience_is_an_asset_and_a_second_run_sends_nothing(
    recipe: Any, gist: FakeGist
) -> None:
    result, log = materialize(recipe)

    assert result.success
    assets = materialized(result)
    assert {k: (m["status"], m["entered"], m["delivered"]) for k, m in assets.items()} == {
        VIP: ("succeeded", 3, 3),
        CHURN: ("succeeded", 3, 3),
    }
    checks = {c.asset_key.to_user_string(): c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {VIP: True, CHURN: True}
    assert_synced(gist)
    # The tool's own log lines are in the run's event log.
    assert f"{VIP}: 3 rows, 3 members, 3 entered, 0 exited" in messages(log)

    again, _ = materialize(recipe)

    assert again.success
    assert {k: m["delivered"] for k, m in materialized(again).items()} == {VIP: 0, CHURN: 0}
    assert_synced(gist)  # no request more


def test_a_refused_key_fails_at_once_without_a_retry(
    recipe: Any, gist: FakeGist, state: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIST_API_KEY", "wrong-key")

    result, log = materialize(recipe)

    assert not result.success
    assert not kinds(log) & set(RETRY)
    assert materialized(result) == {}
    assert f"{VIP}: failed (auth): Gist refused the API key" in failure(result)
    assert all(r.status == 401 for r in gist.requests())
    assert acknowledged(state, VIP) == set()


def test_gist_unavailable_is_retried(recipe: Any, gist: FakeGist) -> None:
    gist.fail_after(0, 503)

    result, log = materialize(recipe)

    assert not result.success
    assert set(RETRY) <= kinds(log)
    assert "(unavailable)" in failure(result)


def test_a_config_broken_after_loading_fails_at_once(recipe: Any, site: Workspace) -> None:
    site.config_path.write_text("[gist]\napi_key = 1\n")

    result, log = materialize(recipe)

    assert not result.success
    assert not kinds(log) & set(RETRY)
    assert "audience-sync (config)" in failure(result)


def test_a_held_audience_is_named_and_not_materialised(
    recipe: Any, gist: FakeGist, state: Engine
) -> None:
    hold(state, CHURN)

    result, log = materialize(recipe)

    assert result.success
    assert set(materialized(result)) == {VIP}
    assert {c.asset_key.to_user_string() for c in result.get_asset_check_evaluations()} == {VIP}
    assert f"{CHURN}: not synced: audience '{CHURN}' is being synced by {HOLDER}" in messages(log)
    assert_synced(gist, (VIP,))


def test_an_audience_gist_refuses_fails_the_step_and_the_others_are_recorded(
    recipe: Any, gist: FakeGist
) -> None:
    gist.fail_user("u0", 422, "Email is invalid")

    result, log = materialize(recipe)

    assert not result.success
    assert not kinds(log) & set(RETRY)  # the same change would be refused again
    assert set(materialized(result)) == {CHURN}
    assert f"{VIP}: partial (refused)" in failure(result)
    assert {u for u, v in gist.properties(VIP).items() if v} == users(1, 2)


def test_the_command_line_materialises_one_audience(site: Workspace, gist: FakeGist) -> None:
    """What the issue ran: ``dagster asset materialize -f`` selects one audience's asset."""
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-f", str(RECIPE),
         "--select", VIP],
        env={**os.environ, "GIST_API_KEY": API_KEY},
        cwd=site.root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-2000:]
    assert_synced(gist, (VIP,))
    assert gist.properties(CHURN) == {}
