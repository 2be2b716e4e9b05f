"""What every recipe's tests share: a config of two audiences over a SQLite state and the
fake Gist, and what Gist must hold after they are synced. Neither Dagster nor Airflow is
imported here: the README's test environment has neither, and their tests skip there."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

from audience_sync import db
from audience_sync.fakegist import FakeGist
from tests.conftest import Workspace, plant_lease, write_members
from tests.helpers import users

RECIPES = Path(__file__).parents[2] / "examples" / "orchestrators"
VIP, CHURN = "vip_customers", "churn_risk"
HOLDER = "daemon@elsewhere:4242"


def skip_reason(orchestrator: str, env: str) -> str:
    """Why a recipe's tests skip where its orchestrator is absent, and where they run."""
    return (
        f"{orchestrator} is not installed in this environment: .ci/run runs these tests in "
        f"{env} (examples/orchestrators/setup_envs.sh makes it)"
    )


@pytest.fixture
def site(tmp_path: Path, gist: FakeGist, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """Two file audiences sharing a user over a SQLite state and the fake Gist; the recipes
    find the config through ``AUDIENCE_SYNC_CONFIG``."""
    workspace = Workspace(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", gist.url)
    write_members(workspace.add_file_audience("VIP Customers"), range(3))
    write_members(workspace.add_file_audience("Churn Risk"), range(2, 5))
    monkeypatch.setenv("AUDIENCE_SYNC_CONFIG", str(workspace.config_path))
    return workspace


@pytest.fixture
def state(site: Workspace) -> Engine:
    """The site's state database, migrated."""
    engine = db.make_engine(site.state_url)
    db.upgrade(engine)
    return engine


def hold(engine: Engine, key: str) -> None:
    """Another worker holds ``key``'s lease for the next five minutes."""
    plant_lease(engine, key, HOLDER, 300)


def assert_synced(gist: FakeGist, keys: tuple[str, ...] = (VIP, CHURN)) -> None:
    """Gist holds what the site's audiences say, sent as one request per user."""
    expected = {VIP: users(0, 1, 2), CHURN: users(2, 3, 4)}
    for key in keys:
        assert {u for u, v in gist.properties(key).items() if v is True} == expected[key]
    contacts = gist.requests("/contacts")
    assert all(r.status == 200 for r in contacts)
    assert len(contacts) == len(set().union(*(expected[k] for k in keys)))
