"""What the benchmark measures: load + diff against two floors, the unchanged file, the
warehouse-native path against a baseline revision, delivery throughput and the rate limit.

Each ``measure_*`` fills a result object as it goes, so what was measured before a failure
is kept beside the error.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import (
    API_KEY,
    AUDIENCE_KEY,
    CURRENT,
    PG_OTHER_URL,
    BenchError,
    Cli,
    Samples,
    copy_source,
    engine_seconds,
    fake_gist,
    last_run,
    member_rows,
    pg_conninfo,
    pg_schema,
    planned,
    run_child,
    run_results,
    say,
    scratch,
    sent_since_clear,
    source_rows,
    state_store,
    write_config,
    write_source,
)

if TYPE_CHECKING:
    import psycopg

BATCH_SIZE = 500
FLOOR_CHUNK = 5000
FLOOR_WORK_MEM = "256MB"  # one hash batch for the floor's join: the least any design needs
DELIVERY_CONCURRENCY = 8
DELIVERY_FLOOR = Path(__file__).with_name("delivery_floor.py")
RATE_LIMIT = 50.0
NATIVE_STATE = 'source = "state"'
NAIVE_CODE = """
import csv, json, resource, sys, time
start = time.perf_counter()
snapshots = []
for path in sys.argv[1:3]:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        snapshots.append({row[0]: row[1] for row in reader})
old, new = snapshots
entered = new.keys() - old.keys()
exited = old.keys() - new.keys()
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "entered": len(entered), "exited": len(exited),
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
# The floor's diff: SQLite has no hash join, and an unindexed table on the inner side of an
# anti-join is probed by a full scan per row, so the entered side probes the memberships'
# primary key and the exited side is a sorted EXCEPT (its best plans, measured).
SQLITE_ENTERED = (
    "SELECT count(*) FROM floor_t f WHERE NOT EXISTS "
    "(SELECT 1 FROM memberships m WHERE m.audience_key = ? AND m.user_id = f.user_id)"
)
SQLITE_EXITED = (
    "SELECT count(*) FROM (SELECT user_id FROM memberships WHERE audience_key = ? "
    "EXCEPT SELECT user_id FROM floor_t)"
)
# PostgreSQL: one hash full join gives both directions in one pass (4x two NOT EXISTS).
PG_DIFF = (
    "SELECT count(*) FILTER (WHERE m.user_id IS NULL), count(*) FILTER (WHERE f.user_id IS NULL) "
    "FROM floor_t f FULL JOIN (SELECT user_id FROM memberships WHERE audience_key = %s) m "
    "ON m.user_id = f.user_id"
)


@dataclass
class SizeResult:
    """Every figure measured for one source size on one state store."""

    n: int
    store: str
    churn_expected: int
    batch_size: int | None = None
    full_diff_flag: bool | None = None  # whether `run --full-diff` exists in this version
    initial_s: float | None = None  # the engine's own time (finished_at - started_at)
    initial_cli_s: float | None = None  # wall time of the CLI process
    initial_rss_mb: float | None = None
    churn_s: Samples = field(default_factory=Samples)  # dry run: staging + diff
    churn_cli_s: Samples = field(default_factory=Samples)
    churn_rss_mb: Samples = field(default_factory=lambda: Samples(stat="max"))
    churn_planned: int | None = None
    floor_s: Samples = field(default_factory=Samples)  # csv.reader + bulk insert
    diff_floor_s: Samples = field(default_factory=Samples)  # the same + one bare anti-join
    churn_real_s: float | None = None
    churn_http_requests: int | None = None
    churn_sent: int | None = None
    churn_distinct: int | None = None
    churn_match: bool | None = None
    unchanged_s: Samples = field(default_factory=Samples)  # real run, byte-identical file
    unchanged_cli_s: Samples = field(default_factory=Samples)
    unchanged_requests: int | None = None
    unchanged_planned: int | None = None
    nochange_s: Samples = field(default_factory=Samples)  # dry run with a full diff
    nochange_cli_s: Samples = field(default_factory=Samples)
    nochange_rss_mb: Samples = field(default_factory=lambda: Samples(stat="max"))
    nochange_planned: int | None = None
    naive_s: float | None = None
    naive_peak_mb: float | None = None
    skipped: str | None = None
    error: str | None = None
    error_detail: str | None = None


@dataclass
class WarehouseResult:
    """A churn dry run whose SQL source lives in the PostgreSQL state database: natively,
    through Python, and through Python on the baseline revision."""

    n: int
    churn_expected: int
    store: str = "postgresql"
    native_mode: str | None = None  # how the config asks for the in-database path
    native_s: Samples = field(default_factory=Samples)
    native_cli_s: Samples = field(default_factory=Samples)
    native_rss_mb: Samples = field(default_factory=lambda: Samples(stat="max"))
    native_planned: int | None = None
    native_rows_python: float | None = None  # audience_sync_source_rows_total, when written
    native_rows_database: float | None = None
    regular_s: Samples = field(default_factory=Samples)
    regular_planned: int | None = None
    regular_rows_python: float | None = None
    regular_rows_database: float | None = None
    baseline_commit: str | None = None
    baseline_s: Samples = field(default_factory=Samples)
    baseline_planned: int | None = None
    error: str | None = None
    error_detail: str | None = None


@dataclass
class DeliveryResult:
    """Delivery throughput of one store at one fake latency, over repeated first syncs."""

    store: str
    latency_ms: int
    changes: int
    target_per_s: float | None = None  # max_concurrency / latency
    dry_s: Samples = field(default_factory=Samples)  # finished_at - started_at
    real_s: Samples = field(default_factory=Samples)
    delivery_s: Samples = field(default_factory=Samples)  # real - dry of the same store
    real_cli_s: Samples = field(default_factory=Samples)
    fake_side_per_s: Samples = field(default_factory=Samples)
    floor_per_s: Samples = field(default_factory=Samples)  # delivery_floor.py, same fake
    error: str | None = None


@dataclass
class RateResult:
    """How closely one run held the configured rate against a fake that limits at it."""

    store: str
    run: int
    limit_per_s: float
    changes: int
    ok_answers: int | None = None
    answers_429: int | None = None
    achieved_per_s: float | None = None
    error: str | None = None


# ------------------------------------------------------------------------------ floors


def measure_floor(store: str, state_url: str, source: Path) -> tuple[float, float]:
    """Seconds of the bare-load floor and of the load+diff floor (that load plus one bare
    anti-join against the acknowledged set), taken in one pass over ``source``."""
    if store == "sqlite":
        return _floor_sqlite(Path(state_url.removeprefix("sqlite:///")), source)
    return _floor_postgres(state_url, source)


def _floor_sqlite(db_path: Path, source: Path) -> tuple[float, float]:
    connection = sqlite3.connect(db_path, isolation_level=None)
    try:
        connection.execute("PRAGMA synchronous=NORMAL")  # as audience-sync's engine sets
        connection.execute("DROP TABLE IF EXISTS floor_t")
        connection.execute("CREATE TABLE floor_t (user_id TEXT, email TEXT)")
        start = time.perf_counter()
        with source.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            next(reader)
            while True:
                chunk = [row for _, row in zip(range(FLOOR_CHUNK), reader, strict=False)]
                if not chunk:
                    break
                connection.execute("BEGIN")
                connection.executemany("INSERT INTO floor_t VALUES (?, ?)", chunk)
                connection.execute("COMMIT")
        loaded = time.perf_counter()
        entered = connection.execute(SQLITE_ENTERED, (AUDIENCE_KEY,)).fetchone()[0]
        exited = connection.execute(SQLITE_EXITED, (AUDIENCE_KEY,)).fetchone()[0]
        diffed = time.perf_counter()
        connection.execute("DROP TABLE floor_t")
    finally:
        connection.close()
    return loaded - start, _checked(diffed - start, entered, exited)


def _floor_postgres(state_url: str, source: Path) -> tuple[float, float]:
    import psycopg

    with psycopg.connect(pg_conninfo(state_url)) as pg:
        pg.execute("DROP TABLE IF EXISTS floor_t")
        pg.execute("CREATE TABLE floor_t (user_id TEXT, email TEXT)")
        pg.execute(f"SET work_mem = '{FLOOR_WORK_MEM}'")
        pg.commit()
        start = time.perf_counter()
        with pg.cursor() as cursor, source.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            next(reader)
            with cursor.copy("COPY floor_t (user_id, email) FROM STDIN") as copy:
                for row in reader:
                    copy.write_row(row)
        pg.commit()
        loaded = time.perf_counter()
        counts = pg.execute(PG_DIFF, (AUDIENCE_KEY,)).fetchone()
        diffed = time.perf_counter()
        pg.execute("DROP TABLE floor_t")
        pg.commit()
    entered, exited = counts if counts else (0, 0)
    return loaded - start, _checked(diffed - start, int(entered), int(exited))


def _checked(seconds: float, entered: int, exited: int) -> float:
    """``seconds``, once the floor's diff found both halves of the churn (it must do the
    same work as the engine's, not an empty join)."""
    if entered == 0 or exited == 0:
        raise BenchError(f"the floor's diff found {entered} entered and {exited} exited")
    return seconds


def measure_naive(folder: Path, old: Path, new: Path) -> tuple[float, float]:
    """Seconds and peak MB of a Python process that loads both snapshots and diffs them."""
    run = run_child(folder, [sys.executable, "-c", NAIVE_CODE, str(old), str(new)], tag="naive")
    data = json.loads(run.stdout)
    return float(data["seconds"]), float(data["maxrss_kb"]) / 1024


# ------------------------------------------------------------------- load + diff by size


def measure_size(
    result: SizeResult,
    folder: Path,
    sources: tuple[Path, Path],
    repeat: int,
    cli: Cli = CURRENT,
) -> None:
    """Initial sync, then per 1% churn: dry runs and the floors, the real run; then real runs
    of the byte-identical file and full-diff dry runs of it. Fills ``result``."""
    n, store, expected = result.n, result.store, result.churn_expected
    v0, v1 = sources
    source = folder / "members.csv"
    tag = f"{store} N={n:,}"
    with state_store(store, folder) as url, fake_gist() as gist:
        config = write_config(
            folder / f"bench-{store}.toml", url, gist.url, {"file": source},
            max_concurrency=16, batch_size=result.batch_size,
        )  # fmt: skip
        cfg = ["--config", str(config)]
        copy_source(v0, source)  # the config check wants the file to exist
        cli.run(folder, ["db", "upgrade", *cfg])
        result.full_diff_flag = cli.has_flag(folder, "run", "--full-diff")
        full_diff = ["--full-diff"] if result.full_diff_flag else []
        say(f"{tag}: initial sync")
        initial = cli.run(folder, ["run", *cfg, "--json"], tag="initial")
        result.initial_cli_s, result.initial_rss_mb = initial.seconds, initial.peak_rss_mb
        sent_since_clear(gist)
        done = run_results(initial)
        if done[0].get("status") != "succeeded" or done[0].get("delivered") != n:
            raise BenchError(f"initial sync did not deliver all {n}: {done}")
        result.initial_s = engine_seconds(last_run(cli, folder, config), "run")

        copy_source(v1, source)
        for i in range(repeat):
            say(f"{tag}: churn load + diff (dry run {i + 1}/{repeat}) and the floors")
            dry = cli.run(folder, ["run", *cfg, "--dry-run", "--quiet", *full_diff], tag="churn")
            result.churn_cli_s.add(dry.seconds)
            result.churn_rss_mb.add(dry.peak_rss_mb)
            recorded = last_run(cli, folder, config)
            result.churn_s.add(engine_seconds(recorded, "dry-run"))
            result.churn_planned = _same_plan(result.churn_planned, planned(recorded), "churn")
            # Against the same acknowledged set as the dry run: before the churn is sent.
            load, diff = measure_floor(store, url, v1)
            result.floor_s.add(load)
            result.diff_floor_s.add(diff)
        if result.churn_planned != expected:
            raise BenchError(f"the churn dry run planned {result.churn_planned}, not {expected}")

        say(f"{tag}: churn real run")
        cli.run(folder, ["run", *cfg, "--json"], tag="churn-real")
        sent = sent_since_clear(gist)
        result.churn_real_s = engine_seconds(last_run(cli, folder, config), "run")
        result.churn_http_requests = sent.http_requests
        result.churn_sent = sent.contact_updates
        result.churn_distinct = sent.distinct_users
        result.churn_match = sent.contact_updates == expected and sent.distinct_users == expected

        result.unchanged_requests = result.unchanged_planned = 0
        for i in range(repeat):
            # Right after a fully acknowledged run; rewritten, so only its bytes are the same.
            say(f"{tag}: unchanged file, real run {i + 1}/{repeat}")
            copy_source(v1, source)
            real = cli.run(folder, ["run", *cfg, "--json"], tag="unchanged")
            result.unchanged_cli_s.add(real.seconds)
            result.unchanged_requests += sent_since_clear(gist).http_requests
            recorded = last_run(cli, folder, config)
            result.unchanged_s.add(engine_seconds(recorded, "run"))
            result.unchanged_planned += planned(recorded)

        for i in range(repeat):
            say(f"{tag}: no change, full-diff dry run {i + 1}/{repeat}")
            dry = cli.run(folder, ["run", *cfg, "--dry-run", "--quiet", *full_diff], tag="same")
            result.nochange_cli_s.add(dry.seconds)
            result.nochange_rss_mb.add(dry.peak_rss_mb)
            recorded = last_run(cli, folder, config)
            result.nochange_s.add(engine_seconds(recorded, "dry-run"))
            result.nochange_planned = _same_plan(
                result.nochange_planned, planned(recorded), "no-change"
            )


def _same_plan(before: int | None, now: int, what: str) -> int:
    """The planned count of a repeated dry run, which must not differ between repeats."""
    if before is not None and before != now:
        raise BenchError(f"repeated {what} dry runs planned {before} and then {now}")
    return now


# ---------------------------------------------------------------------- warehouse-native


def supports_state_source(cli: Cli, folder: Path, state_url: str) -> bool:
    """Whether this version's config accepts ``source = "state"`` in an audience (probed
    with the PostgreSQL state it will be used with)."""
    config = write_config(
        folder / "probe.toml", state_url, "http://127.0.0.1:9",
        {"source": "state", "query": "SELECT user_id, email FROM members"}, max_concurrency=1,
    )  # fmt: skip
    return cli.run(folder, ["audiences", "--config", str(config)], expect=(0, 2)).returncode == 0


def measure_warehouse(
    result: WarehouseResult, folder: Path, repeat: int, seed: int, baseline: Cli | None
) -> None:
    """Churn dry runs of an audience whose members sit in a table of the state database:
    in-database (native), through Python (a source URL other than state.url), and through
    Python on ``baseline``. Fills ``result``."""
    import psycopg

    n, expected = result.n, result.churn_expected
    tag = f"warehouse N={n:,}"
    with (
        pg_schema("bench_wh") as warehouse,
        state_store("postgresql", folder) as url,
        state_store("postgresql", folder) as baseline_url,
        fake_gist() as gist,
        psycopg.connect(pg_conninfo(url), autocommit=True) as pg,
    ):
        table = f'"{warehouse}".members'
        query = f"SELECT user_id, email FROM {table}"
        pg.execute(f"CREATE TABLE {table} (user_id TEXT NOT NULL, email TEXT NOT NULL)")
        _load_members(pg, table, member_rows(n))
        native_audience: dict[str, str] = {"source": "state", "query": query}
        native_sources: dict[str, str] = {}
        if supports_state_source(CURRENT, folder, url):
            result.native_mode = NATIVE_STATE
        else:
            result.native_mode = "source URL = state.url"
            native_audience["source"] = "warehouse"
            native_sources = {"warehouse": url}
        regular = {"source": "warehouse", "query": query}
        configs = {
            "native": write_config(
                folder / "native.toml", url, gist.url, native_audience,
                max_concurrency=16, batch_size=BATCH_SIZE, sources=native_sources,
            ),
            "regular": write_config(
                folder / "regular.toml", url, gist.url, regular,
                max_concurrency=16, batch_size=BATCH_SIZE, sources={"warehouse": PG_OTHER_URL},
            ),
            "baseline": write_config(
                folder / "baseline.toml", baseline_url, gist.url, regular,
                max_concurrency=16, batch_size=BATCH_SIZE, sources={"warehouse": PG_OTHER_URL},
            ),
        }  # fmt: skip
        runners: dict[str, Cli] = {"native": CURRENT, "regular": CURRENT}
        if baseline is not None:
            runners["baseline"] = baseline
            result.baseline_commit = baseline.commit
        for name in ("regular", "baseline"):  # regular's state is native's too
            if name not in runners:
                continue
            cfg = ["--config", str(configs[name])]
            say(f"{tag}: {runners[name].name} initial sync")
            runners[name].run(folder, ["db", "upgrade", *cfg])
            done = run_results(runners[name].run(folder, ["run", *cfg, "--json"], tag="initial"))
            if done[0].get("status") != "succeeded" or done[0].get("delivered") != n:
                raise BenchError(f"{runners[name].name} initial sync did not deliver {n}: {done}")
            sent_since_clear(gist)

        pg.execute(f"TRUNCATE {table}")
        _load_members(pg, table, member_rows(n, seed=seed))
        for i in range(repeat):
            # Interleaved, so a busy moment of the machine weighs on all three alike.
            for name, cli in runners.items():
                say(f"{tag}: {name} churn dry run {i + 1}/{repeat}")
                metrics = folder / f"{name}.prom"
                metrics.unlink(missing_ok=True)
                cfg = ["--config", str(configs[name])]
                dry = cli.run(
                    folder, ["run", *cfg, "--dry-run", "--quiet", "--metrics-file", str(metrics)],
                    tag=name,
                )  # fmt: skip
                recorded = last_run(cli, folder, configs[name])
                seconds = engine_seconds(recorded, "dry-run")
                count = planned(recorded)
                if count != expected:
                    raise BenchError(f"the {name} dry run planned {count}, not {expected}")
                # Written with no sample of a path: no row took that path.
                found = source_rows(metrics)
                rows = {} if found is None else {"python": 0.0, "database": 0.0, **found}
                if name == "native":
                    result.native_s.add(seconds)
                    result.native_cli_s.add(dry.seconds)
                    result.native_rss_mb.add(dry.peak_rss_mb)
                    result.native_planned = count
                    result.native_rows_python = rows.get("python")
                    result.native_rows_database = rows.get("database")
                elif name == "regular":
                    result.regular_s.add(seconds)
                    result.regular_planned = count
                    result.regular_rows_python = rows.get("python")
                    result.regular_rows_database = rows.get("database")
                else:
                    result.baseline_s.add(seconds)
                    result.baseline_planned = count


def _load_members(pg: psycopg.Connection[Any], table: str, rows: Iterable[tuple[str, str]]) -> None:
    """COPY ``rows`` into the warehouse table and refresh its statistics."""
    with pg.cursor() as cursor, cursor.copy(f"COPY {table} (user_id, email) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    pg.execute(f"ANALYZE {table}")


# ------------------------------------------------------------------ delivery, rate limit


def measure_delivery(
    result: DeliveryResult, root: Path, repeat: int, store: str, cli: Cli = CURRENT
) -> None:
    """changes/s of first syncs of ``result.changes`` members at the fake's latency, one
    request per change, each on a fresh store and fake. Fills ``result``."""
    latency = result.latency_ms / 1000
    if latency > 0:
        result.target_per_s = DELIVERY_CONCURRENCY / latency
    for i in range(repeat):
        say(f"{store}: delivery at {result.latency_ms} ms latency, run {i + 1}/{repeat}")
        with (
            scratch(root, "bench-delivery-") as folder,
            state_store(store, folder) as url,
            fake_gist(latency=latency) as gist,
        ):
            source = folder / "members.csv"
            write_source(source, result.changes)
            config = write_config(
                folder / "bench.toml", url, gist.url, {"file": source},
                max_concurrency=DELIVERY_CONCURRENCY,
            )  # fmt: skip
            cfg = ["--config", str(config)]
            cli.run(folder, ["db", "upgrade", *cfg])
            cli.run(folder, ["run", *cfg, "--dry-run", "--quiet"], tag="dry")
            dry_s = engine_seconds(last_run(cli, folder, config), "dry-run")
            real = cli.run(folder, ["run", *cfg, "--json"], tag="real")
            sent = sent_since_clear(gist)
            delivered = int(run_results(real)[0].get("delivered") or 0)
            if delivered != result.changes:
                raise BenchError(f"delivered {delivered} of {result.changes}")
            real_s = engine_seconds(last_run(cli, folder, config), "run")
            # The same number of requests from a bare client, against the same fake.
            floor = run_child(folder, [
                sys.executable, str(DELIVERY_FLOOR), gist.url, API_KEY, str(result.changes),
                str(DELIVERY_CONCURRENCY),
            ], tag="delivery-floor")  # fmt: skip
        result.dry_s.add(dry_s)
        result.real_s.add(real_s)
        result.delivery_s.add(max(real_s - dry_s, 0.001))
        result.real_cli_s.add(real.seconds)
        result.fake_side_per_s.add(sent.ok_rate())
        result.floor_per_s.add(json.loads(floor.stdout)["per_s"])


def measure_rate(result: RateResult, root: Path, cli: Cli = CURRENT) -> None:
    """One run of ``result.changes`` changes at ``requests_per_second = limit`` against a fake
    that answers 429 above ``limit`` requests in any second. Fills ``result``."""
    with (
        scratch(root, "bench-rate-") as folder,
        state_store(result.store, folder) as url,
        fake_gist(rate_limit=result.limit_per_s) as gist,
    ):
        source = folder / "members.csv"
        write_source(source, result.changes)
        config = write_config(
            folder / "bench.toml", url, gist.url, {"file": source},
            requests_per_second=result.limit_per_s, max_concurrency=DELIVERY_CONCURRENCY,
        )  # fmt: skip
        cfg = ["--config", str(config)]
        cli.run(folder, ["db", "upgrade", *cfg])
        cli.run(folder, ["run", *cfg, "--json"], tag="rate")
        sent = sent_since_clear(gist)
    result.ok_answers = sent.status_counts.get("200", 0)
    result.answers_429 = sent.status_counts.get("429", 0)
    result.achieved_per_s = sent.ok_rate()
