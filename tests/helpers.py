"""Helpers several test modules share (fixtures live in conftest.py): what Gist and the
state database hold, a free loopback port, `audience-sync fake-gist` as a process, a TCP
proxy that partitions, the one place tests call the lease module (so a change of its
signatures is repointed here, not in every test), and a history made by real runs for the
pages to show (one per test module)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import DateTime, Engine, create_engine, select, text, type_coerce
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from audience_sync import db, lease
from audience_sync.fakegist import FakeGist
from audience_sync.models import leases, memberships
from tests.conftest import EXECUTABLE

KEY = "order_completed_last_30days"  # the property of "Order Completed Last 30days"


def acknowledged(engine: Engine, key: str = KEY) -> set[str]:
    """The members of ``key`` the state database holds as acknowledged by Gist."""
    with engine.connect() as connection:
        return set(
            connection.scalars(
                select(memberships.c.user_id).where(memberships.c.audience_key == key)
            )
        )


def in_gist(gist: FakeGist, key: str = KEY) -> set[str]:
    """The users whose property ``key`` is ``true`` in the fake Gist."""
    return {user for user, value in gist.properties(key).items() if value is True}


def users(*numbers: int) -> set[str]:
    """``{"u1", "u2", …}`` for ``users(1, 2, …)``."""
    return {f"u{n}" for n in numbers}


def free_port() -> int:
    """A loopback port nothing listens on (right now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class FakeGistProcess:
    """A running `audience-sync fake-gist`: the two lines it said to paste, and its process."""

    base_url: str
    api_key: str
    printed: str
    process: subprocess.Popen[str]

    def contacts(self) -> dict[str, dict[str, Any]]:
        """Every contact it holds by user id, read over its own API."""
        found: dict[str, dict[str, Any]] = {}
        headers = {"Authorization": f"Bearer {self.api_key}"}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=10) as client:
            for page in range(1, 1000):
                body = client.get("/contacts", params={"page": page, "per_page": 100}).json()
                found.update({c["user_id"]: c for c in body["contacts"]})
                if not body["pages"]["next"]:
                    return found
        raise AssertionError("the fake Gist pages without end")


@contextlib.contextmanager
def fake_gist_process(*args: str, env: dict[str, str] | None = None) -> Iterator[FakeGistProcess]:
    """Start `audience-sync fake-gist ARGS` as a user would, wait for the lines it prints to
    paste, and stop it with SIGTERM afterwards, which must end it with exit 0."""
    process = subprocess.Popen(
        [EXECUTABLE, "fake-gist", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    printed: list[str] = []
    for line in process.stdout:  # ends at EOF should it exit instead
        printed.append(line)
        if line.strip().startswith("export GIST_API_KEY="):
            break
    text_ = "".join(printed)
    try:
        url = re.search(r'^\s*base_url = "(.+)"$', text_, re.MULTILINE)
        key = re.search(r"^\s*export GIST_API_KEY=(\S+)$", text_, re.MULTILINE)
        if url is None or key is None:
            process.kill()
            out, err = process.communicate(timeout=10)
            raise FakeGistExitedError(process.returncode, text_ + out, err)
        yield FakeGistProcess(url[1], key[1], text_, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)
            assert process.returncode == 0, f"fake-gist exited {process.returncode} on SIGTERM"


class FakeGistExitedError(Exception):
    """`audience-sync fake-gist` ended before printing what to paste."""

    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        super().__init__(f"fake-gist exited {code}: {stdout}{stderr}")
        self.code, self.stdout, self.stderr = code, stdout, stderr


class PausableProxy:
    """A loopback TCP proxy in front of ``upstream`` that can stop forwarding without closing
    anything: a network partition as the client sees it (sockets open, no answer, no reset).
    ``refuse()`` is an outage instead: every connection is closed and new ones are refused.
    A context manager; ``port`` is where clients connect."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._refusing = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def partition(self) -> None:
        """Stop forwarding in both directions; connections stay open, data waits."""
        self._forwarding.clear()

    def heal(self) -> None:
        """Forward again (what waited goes through) and accept connections again."""
        self._refusing.clear()
        self._forwarding.set()

    def refuse(self) -> None:
        """Close every connection and refuse new ones: the database is down."""
        self._refusing.set()
        with self._lock:
            live = list(self._sockets)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self._forwarding.set()
        self.refuse()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def __enter__(self) -> PausableProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refusing.is_set():
                client.close()
                continue
            client.settimeout(None)
            try:
                server = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets |= {client, server}
            self._start(self._pump, client, server)
            self._start(self._pump, server, client)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        watch = selectors.DefaultSelector()
        watch.register(source, selectors.EVENT_READ)
        try:
            while not self._closed.is_set():
                if not self._forwarding.wait(0.05):
                    continue  # partitioned: read nothing, so nothing moves either way
                if not watch.select(0.05):
                    continue
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            watch.close()
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# Leases ------------------------------------------------------------------------------------

LEASE_SECONDS = lease.LEASE_SECONDS  # the length a lease is taken and renewed for


def take_lease(engine: Engine, key: str, owner: str) -> str | None:
    """``lease.acquire``: the previous owner when an expired or dead lease was taken over;
    raises LockHeldError when another owner's lease is live."""
    return lease.acquire(engine, key, owner)


def renew_leases(engine: Engine, keys: Iterable[str], owner: str) -> set[str]:
    """``lease.renew`` in a transaction of its own: the keys ``owner`` still holds."""
    with engine.begin() as connection:
        return lease.renew(connection, keys, owner)


def lease_of(engine: Engine, key: str) -> tuple[str, datetime, datetime] | None:
    """The lease held on ``key``: (owner, acquired_at, expires_at), naive UTC; None when
    none is (a released lease keeps its row, naming its last holder)."""
    with engine.connect() as connection:
        row = connection.execute(
            select(leases.c.owner, leases.c.acquired_at, leases.c.expires_at).where(
                leases.c.audience_key == key, leases.c.released_at.is_(None)
            )
        ).first()
    return None if row is None else (row.owner, row.acquired_at, row.expires_at)


def database_time(engine: Engine) -> datetime:
    """The state database's own clock, naive UTC, as leases are stamped with it."""
    with engine.connect() as connection:
        now = connection.scalar(
            select(type_coerce(lease.database_now(engine.dialect.name), DateTime()))
        )
    assert isinstance(now, datetime)
    return now


SCRIPT_USER = '<script>alert("owned")</script>'  # a user id that must reach pages escaped


@dataclass(frozen=True)
class History:
    """A state database with a history made by real runs against the fake Gist (see
    ``build_history``): the runs' ids and what the pages should show of them."""

    state_url: str
    config_path: Path
    first: dict[str, int]  # run id of each key's first run
    second: dict[str, int]
    dry: int  # the dry run of vip_customers
    api_key: str


def build_history(root: Path, state_url: str, api_key: str) -> History:
    """Three invocations of ``run_once`` over two audiences and a computed trait:

    1. vip_customers = u1..u5 and ``SCRIPT_USER`` (Gist refuses u5: the run is partial),
       one row rejected (an invalid email); newsletter_b_fans_b (named with markup) =
       u3..u6; plan: u1 gold, u2 silver.
    2. vip_customers = u1..u3, u5, u7 and ``SCRIPT_USER`` (u4 exits, u7 enters, u5 goes
       through); newsletter unchanged; plan: u1 platinum, u2 gone (null).
    3. a dry run of vip_customers that would add u8.
    """
    from audience_sync import db
    from audience_sync.sync import run_once
    from tests.conftest import Workspace

    root.mkdir(parents=True, exist_ok=True)
    with FakeGist(api_key=api_key) as gist:
        workspace = Workspace(root, state_url, gist.url)
        workspace.env = {"GIST_API_KEY": api_key}
        vip = workspace.add_file_audience("VIP Customers")
        news = workspace.add_file_audience("Newsletter <b>Fans</b>")
        plan = root / "plan.jsonl"
        workspace.traits.append({"name": "Plan", "file": plan.name})
        workspace.write_config()
        engine = db.make_engine(state_url)
        try:
            db.upgrade(engine)

            def write(path: Path, rows: Sequence[tuple[str, ...]]) -> None:
                keys = ("user_id", "email", "value")
                path.write_text(
                    "".join(json.dumps(dict(zip(keys, r, strict=False))) + "\n" for r in rows)
                )

            def member(n: int) -> tuple[str, str]:
                return (f"u{n}", f"u{n}@example.com")

            script = (SCRIPT_USER, "script@example.com")
            write(vip, [*map(member, range(1, 6)), script, ("u9", "not-an-email")])
            write(news, [member(n) for n in range(3, 7)])
            write(plan, [("u1", "u1@example.com", "gold"), ("u2", "u2@example.com", "silver")])
            gist.fail_user("u5", 422, "Email is invalid")
            first = {r.audience_key: r.run_id or 0 for r in run_once(workspace.settings(), engine)}
            gist.reset_faults()
            write(vip, [*map(member, (1, 2, 3, 5, 7)), script])
            write(plan, [("u1", "u1@example.com", "platinum")])
            second = {r.audience_key: r.run_id or 0 for r in run_once(workspace.settings(), engine)}
            write(vip, [*map(member, (1, 2, 3, 5, 7, 8)), script])
            (dry,) = run_once(workspace.settings(), engine, "vip_customers", dry_run=True)
        finally:
            engine.dispose()
    assert all(first.values())
    assert all(second.values())
    assert dry.run_id
    return History(state_url, workspace.config_path, first, second, dry.run_id or 0, api_key)


@functools.cache
def migrated_postgres_script() -> tuple[str, str] | None:
    """What ``pg_dump`` writes of a schema the Alembic migrations built (tables, indexes,
    constraints and the ``alembic_version`` row), once per test process, with the name it
    gives that schema; None without a ``pg_dump`` of the server's version. Replaying it costs
    a fourth of migrating a fresh schema, and a few hundred PostgreSQL tests start from it."""
    from tests.conftest import require_postgres

    admin = require_postgres()
    dump = shutil.which("pg_dump")
    if dump is None:
        return None
    with fresh_state_url("postgresql", Path()) as url:
        template = schema_of(url)
        engine = db.make_engine(url)
        db.upgrade(engine)
        engine.dispose()
        server = make_url(admin)
        done = subprocess.run(
            [dump, "--host", server.host or "127.0.0.1", "--port", str(server.port or 5432),
             "--username", server.username or "postgres", "--dbname", server.database or "test",
             "--schema", template, "--no-owner", "--no-privileges", "--inserts"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if done.returncode != 0:  # e.g. a pg_dump older than the server
        return None
    # psql's meta-commands (\restrict) are not SQL; the schema is made by the caller.
    lines = done.stdout.splitlines()
    script = "\n".join(x for x in lines if not x.startswith(("\\", "CREATE SCHEMA ")))
    return script, template


def clone_migrated_postgres(url: str) -> bool:
    """Fill the empty schema of ``url`` (a ``fresh_state_url``) with what the migrations
    built (``migrated_postgres_script``); False when there is no script to replay."""
    dumped = migrated_postgres_script()
    if dumped is None:
        return False
    script, template = dumped
    schema = schema_of(url)
    engine = create_engine(url, poolclass=NullPool)
    try:
        connection = engine.raw_connection()
        try:
            cursor = connection.cursor()  # several statements: one simple query
            cursor.execute(script.replace(template, schema))
            cursor.close()
            connection.commit()
        finally:
            connection.close()
    finally:
        engine.dispose()
    return True


def schema_of(url: str) -> str:
    """The schema of a PostgreSQL ``fresh_state_url`` (its application_name names it)."""
    schema = make_url(url).query["application_name"]
    assert isinstance(schema, str)
    return schema


@contextlib.contextmanager
def fresh_state_url(store: str, folder: Path) -> Iterator[str]:
    """An empty state database URL for tests that share one state across a module (the
    ``state_url`` fixture is per test): a SQLite file in ``folder``, or a fresh schema on
    PostgreSQL (through ``require_postgres``), dropped afterwards."""
    if store == "sqlite":
        yield f"sqlite:///{folder / 'state.db'}"
        return
    from tests.conftest import require_postgres

    admin = require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, poolclass=NullPool)  # survives tests that kill connections
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        # application_name lets a test kill this test's connections and no one else's.
        yield f"{admin}?options=-csearch_path%3D{schema}&application_name={schema}"
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
