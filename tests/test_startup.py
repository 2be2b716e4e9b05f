"""What a command imports: a light one (``history``, ``audiences``, a cron ``run``) loads none
of the heavy modules that only other commands need (issue 27: start-up cost every cron run
paid). Asserted on the modules loaded, never on a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from audience_sync.cli import checking
from audience_sync.fakegist import FakeGist
from audience_sync.reconcile import DEFAULT_PER_PAGE
from tests.conftest import API_KEY, Workspace, write_members

# Needed only by `db upgrade`, `daemon`, `--metrics-file`, `ui`, `reconcile` or `verify`;
# SQLAlchemy's ORM by nothing (the state tables are Core tables).
HEAVY = (
    "alembic", "mako", "apscheduler", "tzlocal", "prometheus_client", "starlette", "uvicorn",
    "jinja2", "sqlalchemy.orm", "audience_sync.scheduler", "audience_sync.metrics",
    "audience_sync.web.app", "audience_sync.reconcile", "audience_sync.verify",
    "audience_sync.bars",
)  # fmt: skip
# Commands that talk to no Gist need no HTTP client either. httpx imports rich (its own
# command line's), so rich is judged here, where httpx is not loaded.
NO_HTTP = ("httpx", "rich", "audience_sync.sync", "audience_sync.gist")

# Runs one command in a fresh interpreter, as the console script does, and prints the
# modules it loaded (stdout is the command's; the list goes to a file).
PROBE = """
import json, sys
out, argv = sys.argv[1], sys.argv[2:]
sys.argv = ["audience-sync", *argv]
from audience_sync.cli import main
try:
    main()
finally:
    with open(out, "w") as handle:
        json.dump(sorted(sys.modules), handle)
"""


def loaded_modules(workspace: Workspace, *args: str) -> set[str]:
    out = workspace.root / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), *args, "--config", str(workspace.config_path)],
        env={**os.environ, "GIST_API_KEY": API_KEY},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(out.read_text()))


def imported(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules for n in names if m == n or m.startswith(n + "."))


@pytest.fixture
def synced(tmp_path: Path, gist: FakeGist) -> Workspace:
    """Ten members, synced once: a cron `run` of it finds nothing to do."""
    workspace = Workspace(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", gist.url)
    write_members(workspace.add_file_audience("Tiny"), range(10))
    loaded_modules(workspace, "run", "--quiet")
    assert len(gist.contacts()) == 10
    return workspace


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "forbidden"),
    [
        (("history",), HEAVY + NO_HTTP),
        (("history", "--json"), HEAVY + NO_HTTP),
        (("audiences",), HEAVY + NO_HTTP),
        (("show", "1"), HEAVY + NO_HTTP),
        (("run", "--dry-run"), HEAVY),
        (("run",), HEAVY),
        (("run", "--json"), HEAVY),
    ],
    ids=["history", "history-json", "audiences", "show", "run-dry-run", "run", "run-json"],
)
def test_a_light_command_imports_no_heavy_module(
    synced: Workspace, args: tuple[str, ...], forbidden: tuple[str, ...]
) -> None:
    assert imported(loaded_modules(synced, *args), forbidden) == []


@pytest.mark.slow
def test_the_heavy_modules_load_where_they_are_needed(synced: Workspace) -> None:
    # The probe itself would miss nothing: a metrics file needs prometheus_client.
    metrics = synced.root / "metrics.prom"
    modules = loaded_modules(synced, "run", "--metrics-file", str(metrics))
    assert imported(modules, ("prometheus_client",)) != []
    assert metrics.exists()


def test_the_reconcile_flag_default_is_reconciles() -> None:
    # Written twice so that parsing flags imports no reconcile.
    assert checking.PER_PAGE == DEFAULT_PER_PAGE
