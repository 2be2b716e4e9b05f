"""Shared fixtures: state stores built by running the migrations (SQLite always, PostgreSQL
when reachable), a loopback fake Gist, and a workspace that writes configs and sources.

Every PostgreSQL test reaches the server through ``require_postgres`` (directly or through
the ``state_url`` fixture): with ``AUDIENCE_SYNC_REQUIRE_POSTGRES`` set, as CI sets it, an
unreachable server fails those tests instead of skipping them, and any test that skips
for PostgreSQL some other way is turned into a failure (``pytest_runtest_makereport``)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Generator, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from sqlalchemy import Engine, create_engine, text

from audience_sync import db, lease
from audience_sync.config import Settings, load_settings
from audience_sync.fakegist import FakeGist
from audience_sync.models import leases

API_KEY = "test-key-SECRET-1234"
# The installed console script beside this interpreter: what a user types.
EXECUTABLE = str(Path(sys.executable).with_name("audience-sync"))

# CI replays the same examples every time, so a landing never hinges on a lucky draw;
# developers' runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
REQUIRE_POSTGRES = "AUDIENCE_SYNC_REQUIRE_POSTGRES"
# Where the test server listens (host:port); another value points the tests elsewhere, e.g.
# at a dead port to check that none of them skips when PostgreSQL is required.
PG_ADDRESS = os.environ.get("AUDIENCE_SYNC_TEST_POSTGRES", "127.0.0.1:5432")
PG_ADMIN_URL = "postgresql+psycopg://{user}@" + PG_ADDRESS + "/test"


@cache
def postgres_admin_url() -> str | None:
    """A URL for the local PostgreSQL server, or None when it cannot be reached."""
    for user in ("postgres", "root"):
        url = PG_ADMIN_URL.format(user=user)
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return url
        except Exception:  # noqa: S112 - any failure means "not reachable", try the next
            continue
        finally:
            engine.dispose()
    return None


def require_postgres() -> str:
    """The local PostgreSQL server's admin URL; skips (fails in CI) when it is down. The one
    way a test asks for PostgreSQL."""
    admin = postgres_admin_url()
    if admin is None:
        if os.environ.get(REQUIRE_POSTGRES):
            pytest.fail(
                f"{REQUIRE_POSTGRES} is set but PostgreSQL is not reachable at {PG_ADDRESS}"
            )
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADDRESS} (database test)")
    return admin


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """With ``AUDIENCE_SYNC_REQUIRE_POSTGRES`` set, a test skipped for PostgreSQL's sake fails,
    whichever way it skipped (a ``pytest.skip`` of its own, a ``skipif``): CI can never pass
    by skipping the PostgreSQL tests."""
    report = yield
    if report.skipped and os.environ.get(REQUIRE_POSTGRES) and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        if "postgres" in str(reason).lower():
            report.outcome = "failed"
            report.longrepr = f"{REQUIRE_POSTGRES} is set, but the test skipped: {reason}"
    return report


# The longest tests, started first when the suite runs on several workers (pytest-xdist), so
# that none of them is the one left running at the end: the model test (minutes), then the
# tests marked slow and the groups (modules whose fixtures are built once for them).
FIRST = ("tests/test_model.py::",)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (pyproject.toml): three workers for every two CPUs. The tests wait more
    than they compute (subprocesses, servers, sleeps, the browser): on 2 CPUs two workers
    kept them about half busy (8 min 17 s of wall for 8 min 20 s of CPU), and a third took
    the suite to 6 min 25 s. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides when set."""
    if config.option.numprocesses != "auto" or os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) * 3 // 2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """On pytest-xdist workers, the longest tests first (a stable sort: the rest keep their
    order, a group's tests theirs). A run on one process keeps pytest's order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(
            key=lambda item: (
                not item.nodeid.startswith(FIRST),
                not (item.get_closest_marker("slow") or item.get_closest_marker("xdist_group")),
            )
        )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty state database URL: a SQLite file, or a fresh schema on PostgreSQL."""
    from tests.helpers import fresh_state_url

    with fresh_state_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite state file the Alembic migrations built, once per test process: copying it
    costs a fifth of migrating afresh, and a few hundred tests start from it."""
    path = tmp_path_factory.mktemp("migrated") / "state.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()  # the last connection checkpoints the WAL: the file is whole
    return path


@pytest.fixture
def engine(state_url: str, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A state database migrated to head by running the Alembic migrations (a copy of what
    they built: on SQLite a file, on PostgreSQL what ``pg_dump`` wrote of a schema; ``upgrade``
    then finds it at head)."""
    if state_url.startswith("sqlite:///"):
        path = Path(state_url.removeprefix("sqlite:///"))
        if not path.exists():  # shutil.copy keeps the owner-only mode the tool gave it
            shutil.copy(request.getfixturevalue("migrated_sqlite"), path)
    else:
        from tests.helpers import clone_migrated_postgres

        clone_migrated_postgres(state_url)
    engine = db.make_engine(state_url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def gist() -> Iterator[FakeGist]:
    """A fake Gist: a real HTTP server on 127.0.0.1."""
    with FakeGist(api_key=API_KEY) as server:
        yield server


class Workspace:
    """A folder holding a config file and the audience sources it points at."""

    def __init__(self, root: Path, state_url: str, gist_url: str) -> None:
        self.root = root
        self.state_url = state_url
        self.gist_url = gist_url
        self.config_path = root / "audience_sync.toml"
        self.env = {"GIST_API_KEY": API_KEY}
        self.gist_options: dict[str, Any] = {
            "requests_per_second": 1000,
            "max_concurrency": 8,
            "timeout_seconds": 2,
            "max_retries": 3,
            "retry_backoff_seconds": 0.01,
        }
        self.audiences: list[dict[str, Any]] = []
        self.traits: list[dict[str, Any]] = []
        self.sources: dict[str, str] = {}
        self.sections: dict[str, dict[str, Any]] = {}  # e.g. {"daemon": {...}, "alerts": {...}}
        self.state_options: dict[str, Any] = {}  # [state] beside its url, e.g. lease_seconds

    def add_file_audience(self, name: str, **options: Any) -> Path:
        """Configure an audience read from ``<key>.jsonl``; returns that file's path."""
        path = self.root / f"{len(self.audiences)}.jsonl"
        path.write_text("")
        self.audiences.append({"name": name, "file": path.name, **options})
        self.write_config()
        return path

    def add_sql_audience(self, name: str, source_url: str, query: str, **options: Any) -> None:
        self.sources.setdefault("warehouse", source_url)
        self.audiences.append({"name": name, "source": "warehouse", "query": query, **options})
        self.write_config()

    def write_config(self) -> None:
        lines = [
            "[state]",
            f"url = {json.dumps(self.state_url)}",
            *(f"{k} = {json.dumps(v)}" for k, v in self.state_options.items()),
            "[gist]",
            'api_key = "${GIST_API_KEY}"',
            f"base_url = {json.dumps(self.gist_url)}",
            *(f"{k} = {json.dumps(v)}" for k, v in self.gist_options.items()),
        ]
        for section, values in self.sections.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        for name, url in self.sources.items():
            lines += [f"[sources.{name}]", f"url = {json.dumps(url)}"]
        for section, entries in (("audiences", self.audiences), ("traits", self.traits)):
            for entry in entries:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def settings(self) -> Settings:
        return load_settings(self.config_path, self.env)


def write_members(path: Path, members: Iterable[int | tuple[Any, Any]]) -> None:
    """Write a JSONL source: ints become ``{"user_id": "u<n>", "email": "u<n>@example.com"}``."""
    rows = []
    for member in members:
        user_id, email = (
            (f"u{member}", f"u{member}@example.com") if isinstance(member, int) else member
        )
        rows.append(json.dumps({"user_id": user_id, "email": email}))
    path.write_text("\n".join(rows) + ("\n" if rows else ""))


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def workspace(tmp_path: Path, state_url: str, gist: FakeGist) -> Workspace:
    """A config over a fresh state database (both stores) and the fake Gist."""
    return Workspace(tmp_path, state_url, gist.url)


def invoker(workspace: Workspace, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run the CLI in-process on the workspace's config: ``invoke(*args) -> (code, out, err)``."""
    from audience_sync.cli import run_cli

    def invoke(*args: str) -> tuple[int, str, str]:
        code = run_cli([*args, "--config", str(workspace.config_path)])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


@pytest.fixture
def cli(
    workspace: Workspace,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Any:
    """The CLI on a migrated state DB and the fake Gist (see ``invoker``)."""
    monkeypatch.setenv("GIST_API_KEY", API_KEY)
    return invoker(workspace, capsys)


def plant_lease(engine: Engine, key: str, owner: str, seconds_left: int) -> None:
    """A lease of ``owner`` on ``key`` that ends ``seconds_left`` from now, database time
    (negative: expired that long ago), as another process would have left it."""
    dialect = engine.dialect.name
    with engine.begin() as connection:
        connection.execute(leases.delete().where(leases.c.audience_key == key))
        connection.execute(
            leases.insert().values(
                audience_key=key,
                owner=owner,
                acquired_at=lease.database_now(dialect),
                expires_at=lease.database_now(dialect, seconds_left),
            )
        )


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_process(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, stdout: Any = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``audience-sync`` as a user would; ``stdout`` may be a file
    descriptor (a pipe), else it is captured."""
    return subprocess.run(
        [EXECUTABLE, *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
        timeout=120,
    )


def assert_no_traceback(stderr: str) -> None:
    """What a user must never see: a Python traceback or an ignored exception."""
    for sign in ("Traceback", "Exception ignored", "BrokenPipeError"):
        assert sign not in stderr, stderr
