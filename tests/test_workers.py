"""``workers``: the live ones by default, the rest on request, and finished one-shot syncs'
rows pruned so that cron cannot fill the table (issue 23, point 15)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, func, select

from audience_sync import lease
from audience_sync.models import workers
from audience_sync.workers import Presence, list_workers
from tests.conftest import Workspace


def plant_worker(engine: Engine, name: str, command: str, *, stopped_ago: float | None,
                 beat_ago: float) -> None:  # fmt: skip
    """A worker row as another process left it: its last heartbeat ``beat_ago`` seconds ago
    (database time), stopped ``stopped_ago`` seconds ago or never (None: alive or dead)."""
    dialect = engine.dialect.name
    with engine.begin() as connection:
        connection.execute(
            workers.insert().values(
                id=name, host="elsewhere", pid=1, boot_id="b", command=command,
                started_at=lease.database_now(dialect, -beat_ago - 60),
                heartbeat_at=lease.database_now(dialect, -beat_ago),
                stopped_at=None if stopped_ago is None
                else lease.database_now(dialect, -stopped_ago),
            )
        )  # fmt: skip


def names(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.scalars(select(workers.c.id)))


def test_a_finished_one_shot_sync_is_forgotten_an_hour_after_it_stopped(engine: Engine) -> None:
    plant_worker(engine, "cron-run-2h", "run", stopped_ago=7200, beat_ago=7200)
    plant_worker(engine, "backfill-2h", "backfill", stopped_ago=7200, beat_ago=7200)
    plant_worker(engine, "cron-run-10m", "run", stopped_ago=600, beat_ago=600)
    plant_worker(engine, "daemon-stopped-2h", "daemon", stopped_ago=7200, beat_ago=7200)
    plant_worker(engine, "run-dead-2h", "run", stopped_ago=None, beat_ago=7200)
    plant_worker(engine, "daemon-gone-8d", "daemon", stopped_ago=None, beat_ago=8 * 86400)

    with Presence(engine, "run") as this:
        # A killed run's row (dead) tells of trouble: kept a week, as a daemon's is.
        assert names(engine) == {
            "cron-run-10m", "daemon-stopped-2h", "run-dead-2h", this.id,
        }  # fmt: skip


def test_workers_lists_the_live_ones_unless_all(
    workspace: Workspace, engine: Engine, cli: Any
) -> None:
    workspace.add_file_audience("VIP")
    plant_worker(engine, "run-dead", "run", stopped_ago=None, beat_ago=7200)
    with Presence(engine, "run"):
        pass
    code, out, err = cli("workers")
    assert (code, err) == (0, "")
    assert out == "No live workers (2 dead or stopped ones: `workers --all` lists them).\n"

    with Presence(engine, "daemon") as alive:
        code, out, _ = cli("workers", "--json")
        assert [w["worker_id"] for w in json.loads(out)] == [alive.id]
        code, out, _ = cli("workers", "--all", "--json")
        assert [w["state"] for w in json.loads(out)] == ["alive", "dead", "stopped"]
        code, out, _ = cli("workers")
        assert [line.split()[1] for line in out.splitlines()[1:]] == ["alive"]


def test_prune_deletes_the_rows_of_workers_gone_longer_than_its_age(
    workspace: Workspace, engine: Engine, cli: Any
) -> None:
    workspace.add_file_audience("VIP")
    plant_worker(engine, "daemon-stopped-3d", "daemon", stopped_ago=3 * 86400, beat_ago=3 * 86400)
    plant_worker(engine, "run-dead-3d", "run", stopped_ago=None, beat_ago=3 * 86400)
    plant_worker(engine, "daemon-stopped-1h", "daemon", stopped_ago=3600, beat_ago=3600)
    with Presence(engine, "daemon") as alive:
        code, out, _ = cli("prune", "--older-than", "2d", "--json", "--dry-run")
        assert (code, json.loads(out)["workers"]) == (0, 2)
        assert len(list_workers(engine)) == 4

        code, out, _ = cli("prune", "--older-than", "2d")
        assert (code, out) == (0, "deleted 0 member_changes, 0 rejected_rows and 2 workers\n")
        assert names(engine) == {"daemon-stopped-1h", alive.id}

        code, out, _ = cli("prune", "--older-than", "0d", "--json")
        assert json.loads(out)["workers"] == 1  # a live worker is never pruned
        with engine.connect() as connection:
            assert connection.scalar(select(func.count()).select_from(workers)) == 1
