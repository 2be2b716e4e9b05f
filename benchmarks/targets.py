"""Issue 27's scenarios: an audience computed by a SQL query on another database (``sql-sqlite``,
``sql-postgresql``) and the start-up of light commands (``startup``), each against its floor
measured in the same run, back to back, medians of ``repeat``.

- ``sql-sqlite``: a SQLite warehouse file (``members``: ``u0..u{N-1}``) and a SQLite state
  file. audience-sync: a first-sync ``run --dry-run --quiet`` on a fresh, migrated state, the
  whole process's wall time. Floor: the same N rows read with ``sqlite3`` (``fetchmany`` of
  5,000) and ``executemany``'d into a bare table of a fresh SQLite file (``synchronous =
  NORMAL``, WAL, one transaction per chunk), in this process.
- ``sql-postgresql``: the warehouse table in one PostgreSQL database, the state in another.
  Floor: psycopg's ``COPY (SELECT user_id, email FROM members) TO STDOUT`` piped block by
  block into ``COPY floor_t FROM STDIN`` of a bare table in the state database.
- ``startup``: ``history``, ``audiences`` and ``run --dry-run`` on a 10-member audience
  synced once (unchanged), each the whole process's wall time, against ``python -c "import
  sqlalchemy, httpx"``.
- ``scale``: a real first sync at ``requests_per_second = 10`` with ``batch_size`` 1 and 100,
  about ``seconds`` long, projected to 1M members and set against the figure on paper,
  1,000,000 / (10 x batch_size) seconds.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness import (
    API_KEY,
    CURRENT,
    NO_MASS_EXIT_GUARD,
    Sent,
    engine_seconds,
    fake_gist,
    last_run,
    run_results,
    say,
    scratch,
    sent_since_clear,
    state_store,
    write_config,
    write_source,
)
from scenarios import DELIVERY_CONCURRENCY

Record = dict[str, Any]
PG_SERVER = "postgres@127.0.0.1:5432"
STARTUP_COMMANDS = {
    "history": ["history"],
    "audiences": ["audiences"],
    "run-dry-run": ["run", "--dry-run"],
}


def _env() -> dict[str, str]:
    return {**os.environ, "GIST_API_KEY": API_KEY}


def _cli(*args: str, check: bool = True) -> float:
    """Wall time of one ``python -m audience_sync`` process."""
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603  # our own CLI, with our own arguments
        [sys.executable, "-m", "audience_sync", *args], capture_output=True, text=True,
        env=_env(), check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if check and done.returncode != 0:
        raise RuntimeError(f"audience-sync {' '.join(args)}: {done.stderr.strip()[-500:]}")
    return elapsed


def _config(path: Path, state_url: str, source_url: str, gist_url: str) -> Path:
    path.write_text(
        "[state]\n"
        f'url = "{state_url}"\n'
        # The first sync that makes the churn's ledger sends 1M contacts on a shared machine:
        # a lease renewal late by the default's 30 s would (rightly) fence the sender.
        "lease_seconds = 600\n"
        "[gist]\n"
        'api_key = "${GIST_API_KEY}"\n'
        f'base_url = "{gist_url}"\n'
        "requests_per_second = 10000\n"
        "batch_size = 500\n"
        "[sources.warehouse]\n"
        f'url = "{source_url}"\n'
        "[[audiences]]\n"
        'name = "Bench"\n'
        'source = "warehouse"\n'
        'query = "SELECT user_id, email FROM members"\n'
        f"mass_exit_min_members = {NO_MASS_EXIT_GUARD}\n"
    )
    return path


def _rows(n: int) -> Iterator[tuple[str, str]]:
    return ((f"u{i}", f"u{i}@example.com") for i in range(n))


def _record(scenario: str, case: str, store: str, n: int | None, figure: list[float],
            floor: list[float]) -> Record:  # fmt: skip
    """Medians of the figure and its floor, their ratio, and the load the machine was under."""
    tool_s, floor_s = statistics.median(figure), statistics.median(floor)
    return {
        "scenario": scenario, "case": case, "store": store, "n": n,
        "cli_s": tool_s, "floor_s": floor_s, "ratio": tool_s / floor_s,
        "load_avg": round(os.getloadavg()[0], 2),
        "samples": {"cli_s": figure, "floor_s": floor},
    }  # fmt: skip


# ------------------------------------------------------------------------------ SQL sources


def measure_sql_sqlite(n: int, folder: Path, repeat: int) -> Record:
    """``sql-sqlite``: first-sync dry run of a SQLite warehouse into a SQLite state."""
    warehouse = folder / "warehouse.db"
    with sqlite3.connect(warehouse) as db:
        db.execute("CREATE TABLE members (user_id TEXT, email TEXT)")
        db.executemany("INSERT INTO members VALUES (?, ?)", _rows(n))
    db.close()
    state = folder / "state.db"
    config = _config(folder / "sql.toml", f"sqlite:///{state}", f"sqlite:///{warehouse}",
                     "http://127.0.0.1:9")  # fmt: skip
    figure, floor = [], []
    for attempt in range(1, repeat + 1):
        say(f"sql-sqlite N={n:,}: round {attempt}/{repeat}")
        floor.append(_sqlite_floor(warehouse, folder / "floor.db"))
        for leftover in folder.glob("state.db*"):
            leftover.unlink()
        _cli("db", "upgrade", "--config", str(config))
        figure.append(_cli("run", "--dry-run", "--quiet", "--config", str(config)))
    record = _record("sql-sqlite", f"sql-sqlite.n{n}", "sqlite", n, figure, floor)

    def churn() -> None:
        with sqlite3.connect(warehouse) as db:
            db.executescript(_CHURN.format(n=n, step=CHURN_STEP, concat="||"))
        db.close()

    churned = _churn_runs(config, churn, lambda: _sqlite_floor(warehouse, folder / "floor.db"),
                          repeat, f"sql-sqlite N={n:,}")  # fmt: skip
    return {**record, **churned}


def _sqlite_floor(warehouse: Path, target: Path) -> float:
    for leftover in target.parent.glob(target.name + "*"):
        leftover.unlink()
    started = time.perf_counter()
    source = sqlite3.connect(warehouse)
    bare = sqlite3.connect(target, isolation_level=None)
    bare.execute("PRAGMA journal_mode = WAL")
    bare.execute("PRAGMA synchronous = NORMAL")
    bare.execute("CREATE TABLE floor_t (user_id TEXT, email TEXT)")
    cursor = source.execute("SELECT user_id, email FROM members")
    while rows := cursor.fetchmany(5000):
        bare.execute("BEGIN")
        bare.executemany("INSERT INTO floor_t VALUES (?, ?)", rows)
        bare.execute("COMMIT")
    source.close()
    bare.close()
    return time.perf_counter() - started


@contextmanager
def _pg_database(prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database (its name), dropped afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = f"postgresql://{PG_SERVER}/test"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def measure_sql_postgresql(n: int, repeat: int, folder: Path) -> Record:
    """``sql-postgresql``: first-sync dry run of a PostgreSQL warehouse (one database) into
    a PostgreSQL state (another)."""
    import psycopg

    with _pg_database("bench_src") as source_db:
        with psycopg.connect(f"postgresql://{PG_SERVER}/{source_db}") as source:
            source.execute("CREATE TABLE members (user_id text, email text)")
            with source.cursor().copy("COPY members FROM STDIN") as copy:
                for row in _rows(n):
                    copy.write_row(row)
            source.execute("ANALYZE members")

        def pg_floor() -> float:
            with _pg_database("bench_state") as state_db:
                return _pg_floor(source_db, state_db)

        def migrated_config(state_db: str) -> Path:
            config = _config(
                folder / "pg.toml", f"postgresql://{PG_SERVER}/{state_db}",
                f"postgresql://{PG_SERVER}/{source_db}", "http://127.0.0.1:9",
            )  # fmt: skip
            _cli("db", "upgrade", "--config", str(config))
            return config

        figure, floor = [], []
        for attempt in range(1, repeat + 1):
            say(f"sql-postgresql N={n:,}: round {attempt}/{repeat}")
            floor.append(pg_floor())
            with _pg_database("bench_state") as state_db:
                config = migrated_config(state_db)
                figure.append(_cli("run", "--dry-run", "--quiet", "--config", str(config)))
        record = _record("sql-postgresql", f"sql-postgresql.n{n}", "postgresql", n, figure, floor)

        def churn() -> None:
            with psycopg.connect(f"postgresql://{PG_SERVER}/{source_db}") as source:
                source.execute(_CHURN.format(n=n, step=CHURN_STEP, concat="||"))
                source.execute("ANALYZE members")

        with _pg_database("bench_state") as state_db:
            config = migrated_config(state_db)
            churned = _churn_runs(config, churn, pg_floor, repeat, f"sql-postgresql N={n:,}")
    return {**record, **churned}


def _pg_floor(source_db: str, state_db: str) -> float:
    import psycopg

    started = time.perf_counter()
    with (
        psycopg.connect(f"postgresql://{PG_SERVER}/{source_db}") as source,
        psycopg.connect(f"postgresql://{PG_SERVER}/{state_db}") as bare,
    ):
        bare.execute("CREATE TABLE floor_t (user_id text, email text)")
        with (
            source.cursor().copy("COPY (SELECT user_id, email FROM members) TO STDOUT") as out,
            bare.cursor().copy("COPY floor_t FROM STDIN") as into,
        ):
            for block in out:
                into.write(block)
    return time.perf_counter() - started


# 1% churn: every 200th member leaves and as many new ones (u{n}...) join.
CHURN_STEP = 200
_CHURN = """
DELETE FROM members WHERE CAST(substr(user_id, 2) AS INTEGER) % {step} = 7;
INSERT INTO members SELECT 'u' {concat} CAST(i AS TEXT), 'u' {concat} CAST(i AS TEXT)
    {concat} '@example.com'
FROM (SELECT {n} + (CAST(substr(user_id, 2) AS INTEGER) / {step}) AS i FROM members
      WHERE CAST(substr(user_id, 2) AS INTEGER) % {step} = 8) AS fresh;
"""


def _churn_runs(
    config: Path, churn: Callable[[], None], floor: Callable[[], float], repeat: int, what: str
) -> Record:
    """A real first sync against the fake (its URL into ``config``), then ``churn`` of the
    warehouse and ``repeat`` rounds of the floor and a dry run of the churn, whose plan must
    hold exactly the changed members."""
    with fake_gist() as gist:
        text = config.read_text().replace('base_url = "http://127.0.0.1:9"',
                                          f'base_url = "{gist.url}"')  # fmt: skip
        config.write_text(text)
        say(f"{what}: first sync against the fake")
        _cli("run", "--quiet", "--config", str(config))
        gist.clear_log()
    churn()
    figure, floors = [], []
    for attempt in range(1, repeat + 1):
        say(f"{what}: 1% churn, round {attempt}/{repeat}")
        floors.append(floor())
        figure.append(_cli("run", "--dry-run", "--quiet", "--config", str(config)))
    planned = _planned(config)
    n = int(what.split("N=")[1].replace(",", ""))
    expected = sum(1 for i in range(n) if i % CHURN_STEP in (7, 8))
    return {
        "churn_cli_s": statistics.median(figure), "churn_floor_s": statistics.median(floors),
        "churn_ratio": statistics.median(figure) / statistics.median(floors),
        "churn_planned": planned, "churn_match": int(planned == expected),
    }  # fmt: skip


def _planned(config: Path) -> int:
    """Changes the last dry run planned (entered + exited), from ``history --json``."""
    done = subprocess.run(  # noqa: S603  # our own CLI
        [sys.executable, "-m", "audience_sync", "history", "--json", "--limit", "1",
         "--config", str(config)], capture_output=True, text=True, env=_env(), check=True,
    )  # fmt: skip
    (last,) = json.loads(done.stdout)
    return int(last["entered"]) + int(last["exited"])


# ------------------------------------------------------------------------------ start-up


def measure_startup(folder: Path, repeat: int) -> list[Record]:
    """``startup``: light commands on a 10-member audience synced once, against
    ``python -c "import sqlalchemy, httpx"``, interleaved round by round."""
    members = folder / "members.csv"
    members.write_text("user_id,email\n" + "".join(f"u{i},u{i}@example.com\n" for i in range(10)))
    with fake_gist() as gist:
        config = folder / "tiny.toml"
        config.write_text(
            f'[state]\nurl = "sqlite:///{folder / "state.db"}"\n'
            f'[gist]\napi_key = "${{GIST_API_KEY}}"\nbase_url = "{gist.url}"\n'
            f'[[audiences]]\nname = "Tiny"\nfile = "{members}"\n'
        )
        _cli("run", "--quiet", "--config", str(config))  # synced: later runs change nothing
        floor: list[float] = []
        figures: dict[str, list[float]] = {name: [] for name in STARTUP_COMMANDS}
        bare: Callable[[], float] = lambda: _python("import sqlalchemy, httpx")  # noqa: E731
        for attempt in range(1, max(repeat, 5) + 1):
            say(f"startup: round {attempt}")
            floor.append(bare())
            for name, args in STARTUP_COMMANDS.items():
                figures[name].append(_cli(*args, "--config", str(config)))
    return [
        _record("startup", f"startup.{name}", "sqlite", None, figures[name], floor)
        for name in STARTUP_COMMANDS
    ]


def _python(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)  # noqa: S603  # our own code
    return time.perf_counter() - started


# -------------------------------------------------------------------------------- at scale

SCALE_MEMBERS = 1_000_000  # the first sync projected
SCALE_RATE = 10.0  # requests/s: Gist's documented limit, and the config's default
SCALE_BATCHES = (1, 100)


def scale_members(batch_size: int, seconds: float) -> int:
    """Members of a ``scale`` run taking about ``seconds`` at 10 requests/s: 10 x batch x
    seconds (at least two requests' worth)."""
    return max(2 * batch_size, round(SCALE_RATE * batch_size * seconds))


def paper_seconds(batch_size: int, members: int = SCALE_MEMBERS) -> float:
    """Time to send ``members`` contacts at 10 requests/s, on paper: one slot per request."""
    return members / (SCALE_RATE * batch_size)


def measure_scale(store: str, batch_size: int, seconds: float, root: Path) -> Record:
    """``scale``: a dry run and then a real first sync of ``scale_members`` members against
    the fake (no latency, no limit of its own) at ``requests_per_second = 10``; delivery s
    = real - dry engine time, as in the delivery scenario. What the fake received gives the
    requests and their pace."""
    n = scale_members(batch_size, seconds)
    tag = f"{store}: scale, batch_size {batch_size}, {n:,} members"
    with (
        scratch(root, "bench-scale-") as folder,
        state_store(store, folder) as url,
        fake_gist() as gist,
    ):
        source = folder / "members.csv"
        write_source(source, n)
        config = write_config(
            folder / "scale.toml", url, gist.url, {"file": source},
            max_concurrency=DELIVERY_CONCURRENCY, requests_per_second=SCALE_RATE,
            batch_size=batch_size,
        )  # fmt: skip
        cfg = ["--config", str(config)]
        CURRENT.run(folder, ["db", "upgrade", *cfg])
        say(f"{tag}: dry run")
        CURRENT.run(folder, ["run", *cfg, "--dry-run", "--quiet"], tag="scale-dry")
        dry_s = engine_seconds(last_run(CURRENT, folder, config), "dry-run")
        say(f"{tag}: first sync, about {paper_seconds(batch_size, n):.0f} s on paper")
        real = CURRENT.run(folder, ["run", *cfg, "--json"], tag="scale-real")
        busiest = gist.busiest_second()
        sent = sent_since_clear(gist)
        delivered = int(run_results(real)[0].get("delivered") or 0)
        real_s = engine_seconds(last_run(CURRENT, folder, config), "run")
    if delivered != n or sent.contact_updates != n:
        raise RuntimeError(f"delivered {delivered}, the fake received {sent.contact_updates}, "
                           f"of {n}")  # fmt: skip
    return scale_record(store, batch_size, n, (dry_s, real_s), sent, busiest)


def scale_record(
    store: str, batch_size: int, n: int, engine_s: tuple[float, float], sent: Sent, busiest: int
) -> Record:
    """One ``scale`` run as a record: ``engine_s`` are the dry and the real run's engine
    times, ``sent`` what the fake received, ``busiest`` its busiest second."""
    dry_s, real_s = engine_s
    delivery_s = max(real_s - dry_s, 0.001)
    return {
        "scenario": "scale", "case": f"scale.{store}.batch={batch_size}", "store": store,
        "n": n, "batch_size": batch_size, "requests_per_second": SCALE_RATE,
        "dry_s": dry_s, "real_s": real_s, "delivery_s": delivery_s,
        "http_requests": sent.http_requests, "contacts_per_s": n / delivery_s,
        "requests_per_s": sent.ok_rate(), "busiest_second": busiest,
        "paper_s": paper_seconds(batch_size, n), "paper_1m_s": paper_seconds(batch_size),
        "load_avg": round(os.getloadavg()[0], 2), "samples": {},
    }  # fmt: skip


def project_scale(records: list[Record]) -> list[Record]:
    """``records`` (one store's ``scale`` runs) with the time to a first sync of 1M members:
    1M / the contacts/s achieved, plus the load + plan of 1M, extrapolated linearly from the
    largest of the runs' dry runs (the same for any batch size), and how far that lies from
    the figure on paper."""
    done = [r for r in records if not r.get("error")]
    largest = max(done, key=lambda r: r["n"], default=None)
    load_plan = None if largest is None else largest["dry_s"] * SCALE_MEMBERS / largest["n"]
    out = []
    for rec in records:
        if rec.get("error"):
            out.append(rec)
            continue
        delivery = SCALE_MEMBERS / rec["contacts_per_s"]
        projected = delivery + (load_plan or 0.0)
        ratio = projected / rec["paper_1m_s"]
        out.append({
            **rec, "load_plan_1m_s": load_plan, "load_plan_from_n": largest and largest["n"],
            "delivery_1m_s": delivery, "projected_1m_s": projected,
            "projection_ratio": ratio, "paper_deviation": abs(ratio - 1),
        })  # fmt: skip
    return out
