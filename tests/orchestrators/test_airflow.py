"""The Airflow recipes, loaded and run by Airflow itself (``dag.test()``) against the fake Gist:
``airflow_dag.py`` (audience-sync beside Airflow 3.2+) and ``airflow_separate_env.py`` (the
``audience-sync`` command of another virtualenv). Both must answer alike: counts as the XCom,
a second run sending nothing, a refused key failing at once without a retry (and Gist down
retried), a held audience named while the others' results stay."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from audience_sync.fakegist import FakeGist
from tests.conftest import API_KEY, Workspace, write_members
from tests.helpers import acknowledged
from tests.orchestrators.conftest import (
    CHURN,
    HOLDER,
    RECIPES,
    VIP,
    assert_synced,
    hold,
    skip_reason,
)

if importlib.util.find_spec("airflow") is None:
    pytest.skip(skip_reason("Airflow", ".venv-airflow"), allow_module_level=True)

# Airflow logs through structlog and its own warnings filters; its deprecations are its own.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

IN_ENV, SEPARATE = "airflow_dag.py", "airflow_separate_env.py"
RECIPE_FILES = [IN_ENV, SEPARATE]
# A refused key or a bad config must fail before Airflow's 5-minute retry delay could pass.
AT_ONCE = 60


@pytest.fixture(scope="module")
def dags_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An Airflow home with a migrated metadata database and the recipes in its DAGs folder,
    as a user copies them there. Set before Airflow is first imported: it reads its
    configuration then."""
    home = tmp_path_factory.mktemp("airflow")
    dags = home / "dags"
    dags.mkdir()
    for name in RECIPE_FILES:
        shutil.copy(RECIPES / name, dags / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW_HOME", str(home))
        patch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(dags))
        patch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            check=True,
            capture_output=True,
            timeout=300,
        )
        yield dags


@pytest.fixture(params=RECIPE_FILES)
def recipe(
    request: pytest.FixtureRequest,
    dags_folder: Path,
    site: Workspace,
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    """The recipe's module, loaded from the DAGs folder with the site's config, the Gist key
    in the connection ``gist``, and (separate environment) this environment's command."""
    name: str = request.param
    set_key(monkeypatch, API_KEY)
    monkeypatch.setenv("AUDIENCE_SYNC_EXECUTABLE", str(executable()))
    spec = importlib.util.spec_from_file_location(f"recipe_{name[:-3]}", dags_folder / name)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def executable() -> Path:
    """The ``audience-sync`` command the separate-environment recipe runs: another
    virtualenv's when ``AUDIENCE_SYNC_VENV`` names one (as .ci/run does), else this one's."""
    venv = os.environ.get("AUDIENCE_SYNC_VENV")
    return (
        Path(venv, "bin", "audience-sync")
        if venv
        else Path(sys.executable).parent / "audience-sync"
    )


def set_key(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """The Airflow connection ``gist`` (from the environment) holds ``key``."""
    monkeypatch.setenv("AIRFLOW_CONN_GIST", json.dumps({"conn_type": "generic", "password": key}))


def run_dag(recipe: Any, *, retry_delay: timedelta | None = None) -> tuple[Any, float]:
    """One ``dag.test()`` run of the recipe's DAG; its task instance and how long it took.
    ``retry_delay``: one retry after that long, instead of the recipe's 3 after 5 minutes."""
    dag = recipe.audience_sync_dag
    task = dag.get_task("sync")
    if retry_delay is not None:
        task.retries, task.retry_delay = 1, retry_delay
    started = time.monotonic()
    run = dag.test()
    [ti] = run.get_task_instances()
    return ti, time.monotonic() - started


def summary(ti: Any, key: str = "return_value") -> dict[str, dict[str, Any]]:
    """The task's XCom of results, by audience."""
    return {r["audience"]: r for r in ti.xcom_pull(task_ids="sync", key=key) or []}


def test_a_run_syncs_every_audience_and_the_next_sends_nothing(recipe: Any, gist: FakeGist) -> None:
    ti, _ = run_dag(recipe)

    assert (ti.state, ti.try_number) == ("success", 1)
    results = summary(ti)
    assert {k: (r["status"], r["entered"], r["delivered"]) for k, r in results.items()} == {
        VIP: ("succeeded", 3, 3),
        CHURN: ("succeeded", 3, 3),
    }
    assert_synced(gist)

    again, _ = run_dag(recipe)

    assert again.state == "success"
    assert {k: (r["status"], r["delivered"]) for k, r in summary(again).items()} == {
        VIP: ("succeeded", 0),
        CHURN: ("succeeded", 0),
    }
    assert_synced(gist)  # no request more


def test_a_refused_key_fails_at_once_without_a_retry(
    recipe: Any, gist: FakeGist, state: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_key(monkeypatch, "wrong-key")

    ti, took = run_dag(recipe)

    assert (ti.state, ti.try_number) == ("failed", 1)
    assert took < AT_ONCE
    results = summary(ti, "results")
    assert {k: (r["status"], r["failure"]) for k, r in results.items()} == {
        VIP: ("failed", "auth"),
        CHURN: ("failed", "auth"),
    }
    assert "Gist refused the API key" in results[VIP]["error"]
    assert all(r.status == 401 for r in gist.requests())
    assert acknowledged(state, VIP) == acknowledged(state, CHURN) == set()


def test_gist_unavailable_is_retried(recipe: Any, gist: FakeGist) -> None:
    gist.fail_after(0, 503)

    ti, _ = run_dag(recipe, retry_delay=timedelta(0))

    assert (ti.state, ti.try_number) == ("failed", 2)
    assert {r["failure"] for r in summary(ti, "results").values()} == {"unavailable"}


def test_a_config_error_fails_at_once(
    recipe: Any, site: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.config_path.write_text("[gist]\napi_key = 1\n")

    ti, took = run_dag(recipe)

    assert (ti.state, ti.try_number) == ("failed", 1)
    assert took < AT_ONCE


def test_a_held_audience_is_named_and_the_others_are_synced(
    recipe: Any, gist: FakeGist, state: Engine, capfd: pytest.CaptureFixture[str]
) -> None:
    hold(state, CHURN)

    ti, _ = run_dag(recipe)

    assert ti.state == "success"
    results = summary(ti)
    assert (results[VIP]["status"], results[VIP]["delivered"]) == ("succeeded", 3)
    assert results[CHURN]["status"] == "skipped"
    assert HOLDER in results[CHURN]["error"]
    assert f"{CHURN}: not synced: audience '{CHURN}' is being synced by {HOLDER}" in (
        "".join(capfd.readouterr())
    )
    assert_synced(gist, (VIP,))


def test_every_audience_held_skips_the_task(recipe: Any, gist: FakeGist, state: Engine) -> None:
    hold(state, VIP)
    hold(state, CHURN)

    ti, _ = run_dag(recipe)

    assert ti.state == "skipped"
    assert gist.requests() == []


def test_on_kill_stops_the_sync_gracefully_and_lets_airflow_retry(
    recipe: Any, site: Workspace, gist: FakeGist, state: Engine
) -> None:
    """Airflow calls ``on_kill`` when the task is stopped (SIGTERM to the task): requests in
    flight finish and are recorded, the rest is left for the retry."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    write_members(site.root / "0.jsonl", range(200))
    gist.latency = 0.05
    task = recipe.audience_sync_dag.get_task("sync")
    pushed: dict[str, Any] = {}

    class TaskInstance:
        def xcom_push(self, key: str, value: Any) -> None:
            pushed[key] = value

    def kill_once_sending() -> None:
        deadline = time.monotonic() + AT_ONCE
        while len(gist.requests()) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        task.on_kill()

    killer = threading.Thread(target=kill_once_sending)
    killer.start()
    with pytest.raises(AirflowException) as raised:
        task.execute({"ti": TaskInstance()})
    killer.join()

    assert not isinstance(raised.value, AirflowFailException)
    results = {r["audience"]: r for r in pushed["results"]}
    assert (results[VIP]["status"], results[VIP]["failure"]) == ("interrupted", "interrupted")
    assert 0 < results[VIP]["delivered"] < 200
    assert len(acknowledged(state, VIP)) == results[VIP]["delivered"]
