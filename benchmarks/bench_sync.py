"""Benchmark audience-sync's load + diff, delivery and rate limit against the loopback fake Gist."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from audience_sync.config import GistConfig
from audience_sync.fakegist import FakeGist, RecordedRequest

REPO = Path(__file__).resolve().parent.parent
API_KEY = "bench-fake-key"  # the fake Gist's key; never a real one
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_CONNINFO = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
CHURN_SHARE = 0.005  # removed, and again added: 1% of members change
FLOOR_CHUNK = 5000
BATCH_SIZE = 500
NO_BATCH_MAX_N = 200_000  # without batch delivery, larger initial syncs take too long
TIME_BIN = "/usr/bin/time"
INF = float("inf")
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


class BenchError(Exception):
    """A measurement could not be taken (a CLI run failed, a count was impossible)."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


@dataclass
class CliRun:
    """One ``python -m audience_sync`` child process: wall time, peak RSS, output."""

    args: list[str]
    seconds: float
    peak_rss_mb: float | None
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Sent:
    """What the fake Gist received during one run."""

    http_requests: int = 0
    contact_updates: int = 0  # one per POST /contacts, len(contacts) per batch request
    distinct_users: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    first_ok_at: float | None = None
    last_ok_at: float | None = None


@dataclass
class SizeResult:
    """Every number measured for one source size on one state store."""

    n: int
    store: str
    batch_size: int | None = None
    initial_s: float | None = None  # the engine's own time (finished_at - started_at)
    initial_cli_s: float | None = None  # wall time of the CLI process
    initial_rss_mb: float | None = None
    initial_sent: int | None = None
    churn_expected: int | None = None
    churn_planned: int | None = None
    churn_s: float | None = None  # dry run: finished_at - started_at = staging + diff
    churn_cli_s: float | None = None  # dry run: wall time of the CLI process
    churn_rss_mb: float | None = None
    churn_real_s: float | None = None  # real run: finished_at - started_at
    churn_real_cli_s: float | None = None
    churn_http_requests: int | None = None
    churn_sent: int | None = None
    churn_distinct: int | None = None
    churn_match: bool | None = None
    nochange_s: float | None = None
    nochange_cli_s: float | None = None
    nochange_rss_mb: float | None = None
    nochange_planned: int | None = None
    nochange_sent: int | None = None
    floor_s: float | None = None
    floor_rows_per_s: float | None = None
    churn_ratio: float | None = None
    nochange_ratio: float | None = None
    churn_rows_per_s: float | None = None
    naive_s: float | None = None
    naive_peak_mb: float | None = None
    skipped: str | None = None
    error: str | None = None
    error_detail: str | None = None


@dataclass
class DeliveryResult:
    """Delivery throughput of one store at one fake latency."""

    store: str
    latency_s: float
    changes: int = 0
    dry_s: float | None = None  # finished_at - started_at of the dry run
    real_s: float | None = None  # finished_at - started_at of the real run
    delivery_s: float | None = None  # real_s - dry_s
    dry_cli_s: float | None = None
    real_cli_s: float | None = None
    changes_per_s: float | None = None
    fake_span_per_s: float | None = None
    target_per_s: float | None = None
    share_of_target: float | None = None
    error: str | None = None


@dataclass
class RateResult:
    """How closely one store's run held the configured rate limit."""

    store: str
    limit_per_s: float
    changes: int = 0
    ok_answers: int = 0
    answers_429: int = 0
    achieved_per_s: float | None = None
    share: float | None = None
    error: str | None = None


@dataclass
class Check:
    """One derived target check."""

    name: str
    passed: bool
    detail: str


# ----------------------------------------------------------------------------- helpers


def say(message: str) -> None:
    """Progress line on stderr, so stdout keeps only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_sizes(text: str) -> list[int]:
    """``"100000,1e6,5_000_000"`` -> sorted distinct ints."""
    sizes = sorted({int(float(part.replace("_", ""))) for part in text.split(",") if part.strip()})
    if not sizes or sizes[0] < 200:
        raise argparse.ArgumentTypeError("sizes must be integers >= 200")
    return sizes


def parse_stores(text: str) -> list[str]:
    stores = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stores if s not in ("sqlite", "postgresql")]
    if unknown or not stores:
        raise argparse.ArgumentTypeError(f"stores are sqlite and/or postgresql, not {unknown}")
    return stores


def batch_supported() -> bool:
    """True when the installed audience-sync has batch delivery (``gist.batch_size``)."""
    return "batch_size" in GistConfig.model_fields


def postgres_problem() -> str | None:
    """None when PostgreSQL answers at 127.0.0.1:5432, else why it cannot be used."""
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc}); pip install -e '.[test]'"
    try:
        with psycopg.connect(PG_CONNINFO) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL is not reachable at 127.0.0.1:5432 (database test): {exc}".strip()
    return None


def pg_version() -> str | None:
    if postgres_problem() is not None:
        return None
    import psycopg

    with psycopg.connect(PG_CONNINFO) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else None


@contextmanager
def state_store(store: str, folder: Path) -> Iterator[str]:
    """A fresh, empty state database URL: a SQLite file, or a new PostgreSQL schema."""
    if store == "sqlite":
        path = folder / f"state-{uuid.uuid4().hex[:8]}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_CONNINFO, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_ADMIN}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_CONNINFO, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def pg_schema(url: str) -> str:
    return url.rsplit("%3D", 1)[1]


def write_config(
    path: Path,
    state_url: str,
    gist_url: str,
    source: Path,
    *,
    requests_per_second: float,
    max_concurrency: int,
    batch_size: int | None = None,
) -> Path:
    """A config like tests/conftest.py's Workspace writes, for one file audience."""
    gist = {
        "api_key": API_KEY,
        "base_url": gist_url,
        "requests_per_second": requests_per_second,
        "max_concurrency": max_concurrency,
        "timeout_seconds": 30,
        "max_retries": 5,
        "retry_backoff_seconds": 0.2,
    }
    if batch_size is not None:
        gist["batch_size"] = batch_size
    audience = {
        "name": "Bench",
        "file": str(source),
        "mass_exit_min_members": 1_000_000_000_000,  # the guard never triggers
    }
    lines = ["[state]", f"url = {json.dumps(state_url)}", "[gist]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in gist.items()]
    lines.append("[[audiences]]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in audience.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_source(path: Path, n: int, *, seed: int | None = None) -> int:
    """Stream a CSV of members ``u0..u{n-1}``; with ``seed``, the churned snapshot: 0.5% of
    them removed and as many new members (``u{n}..``) added at random places.
    Returns how many changes the churned snapshot carries (0 without ``seed``)."""
    removed: set[int] = set()
    added: dict[int, int] = {}
    k = 0
    if seed is not None:
        k = max(1, round(n * CHURN_SHARE))
        rng = random.Random(seed)
        removed = set(rng.sample(range(n), k))
        added = {pos: n + j for j, pos in enumerate(sorted(rng.sample(range(n), k)))}
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("user_id,email\n")
        lines: list[str] = []
        for i in range(n):
            if i not in removed:
                lines.append(f"u{i},u{i}@example.com\n")
            new = added.get(i)
            if new is not None:
                lines.append(f"u{new},u{new}@example.com\n")
            if len(lines) >= 10_000:
                handle.write("".join(lines))
                lines = []
        handle.write("".join(lines))
    return 2 * k


def run_cli(
    folder: Path, args: Sequence[str], *, expect: Sequence[int] = (0,), tag: str = "cli"
) -> CliRun:
    """Run ``python -m audience_sync ARGS`` as a child; time it and take its peak RSS."""
    command = [sys.executable, "-m", "audience_sync", *args]
    return run_child(folder, command, expect=expect, tag=tag)


def run_child(
    folder: Path, command: list[str], *, expect: Sequence[int] = (0,), tag: str = "child"
) -> CliRun:
    out_path, err_path = folder / f"{tag}.out", folder / f"{tag}.err"
    rss_path = folder / f"{tag}.rss"
    use_time = os.access(TIME_BIN, os.X_OK)
    full = [TIME_BIN, "-f", "%M", "-o", str(rss_path), *command] if use_time else command
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        process = subprocess.Popen(full, stdout=out, stderr=err, cwd=folder)  # noqa: S603
        try:
            hwm_kb = None if use_time else _poll_hwm(process)
            returncode = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        seconds = time.perf_counter() - start
    if use_time:
        try:
            hwm_kb = int(rss_path.read_text().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            hwm_kb = None
    run = CliRun(
        args=command[3:] if command[1:3] == ["-m", "audience_sync"] else command[1:2],
        seconds=seconds,
        peak_rss_mb=None if hwm_kb is None else hwm_kb / 1024,
        returncode=returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )
    if returncode not in expect:
        output = run.stderr.strip() or run.stdout.strip()
        lines = [line for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        plain = [line for line in lines if not line.startswith("(Background on this error")]
        last = (errors or plain or ["(no output)"])[-1][:300]
        where = " ".join(run.args[:2])
        raise BenchError(f"`{where}` exited {returncode}: {last}", output[-4000:])
    return run


def _poll_hwm(process: subprocess.Popen[bytes]) -> int | None:
    """Peak RSS (VmHWM, KiB) of a child without /usr/bin/time, polled until it exits."""
    peak: int | None = None
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak or 0, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return peak


def last_run(folder: Path, config: Path) -> dict[str, Any]:
    """The newest run recorded in the state database (``history --json --limit 1``)."""
    run = run_cli(folder, ["history", "--config", str(config), "--json", "--limit", "1"])
    runs = json.loads(run.stdout)
    if not runs:
        raise BenchError("history shows no run")
    return dict(runs[0])


def parse_stamp(text: str) -> datetime:
    """``2026-11-27T04:50:12.345Z`` -> an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def engine_seconds(recorded: dict[str, Any], kind: str) -> float:
    """``finished_at - started_at`` of a run recorded in the state database.

    For a dry run that is exactly staging + diff; for a real run, staging + plan + delivery.
    Refuses a run of another kind, one that did not succeed, or one without both stamps.
    """
    where = f"run {recorded.get('id')} ({recorded.get('kind')})"
    if recorded.get("kind") != kind:
        raise BenchError(f"the newest run is {where}, not a {kind}", json.dumps(recorded))
    if recorded.get("status") != "succeeded":
        raise BenchError(
            f"{where} ended {recorded.get('status')}: {recorded.get('error')}",
            json.dumps(recorded),
        )
    started, finished = recorded.get("started_at"), recorded.get("finished_at")
    if not started or not finished:
        raise BenchError(f"{where} has no started_at/finished_at", json.dumps(recorded))
    seconds = (parse_stamp(finished) - parse_stamp(started)).total_seconds()
    if seconds < 0:
        raise BenchError(f"{where} finished before it started", json.dumps(recorded))
    return max(seconds, 0.001)  # the stamps have millisecond precision


def run_results(run: CliRun) -> list[dict[str, Any]]:
    """The per-audience results a ``run --json`` printed."""
    try:
        return list(json.loads(run.stdout))
    except ValueError as exc:
        raise BenchError(f"run --json printed no JSON: {run.stdout[-500:]!r}") from exc


def sent_since_clear(gist: FakeGist) -> Sent:
    """Summarise the fake's request log (contact updates counted per user carried)."""
    log: list[RecordedRequest] = gist.requests()
    sent = Sent(http_requests=len(log))
    users: set[str] = set()
    for request in log:
        key = str(request.status)
        sent.status_counts[key] = sent.status_counts.get(key, 0) + 1
        if request.status == 200:
            if sent.first_ok_at is None or request.at < sent.first_ok_at:
                sent.first_ok_at = request.at
            if sent.last_ok_at is None or request.at > sent.last_ok_at:
                sent.last_ok_at = request.at
        if request.method != "POST" or not isinstance(request.body, dict):
            continue
        path = request.path.rstrip("/")
        items: list[Any] = []
        if path == "/contacts":
            items = [request.body]
        elif path == "/contacts/batch" and isinstance(request.body.get("contacts"), list):
            items = request.body["contacts"]
        for item in items:
            sent.contact_updates += 1
            if isinstance(item, dict):
                users.add(str(item.get("user_id")))
    sent.distinct_users = len(users)
    gist.clear_log()
    return sent


def copy_source(source: Path, target: Path) -> None:
    """Replace the audience's file the way an export job would: write aside, then rename."""
    aside = target.with_suffix(".tmp")
    shutil.copyfile(source, aside)
    os.replace(aside, target)


# ------------------------------------------------------------------------ measurements


def floor_seconds(store: str, state_url: str, source: Path) -> float:
    """Read the CSV with csv.reader and bulk-insert it into a bare table of the state DB."""
    if store == "sqlite":
        db_path = state_url.removeprefix("sqlite:///")
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
            seconds = time.perf_counter() - start
            connection.execute("DROP TABLE floor_t")
        finally:
            connection.close()
        return seconds
    return floor_postgres(state_url, source)


def floor_postgres(state_url: str, source: Path) -> float:
    """The PostgreSQL floor: csv.reader rows streamed through ``COPY ... FROM STDIN``."""
    import psycopg

    conninfo = f"{PG_CONNINFO} options=-csearch_path={pg_schema(state_url)}"
    with psycopg.connect(conninfo) as pg:
        pg.execute("DROP TABLE IF EXISTS floor_t")
        pg.execute("CREATE TABLE floor_t (user_id TEXT, email TEXT)")
        pg.commit()
        start = time.perf_counter()
        with pg.cursor() as cursor, source.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            next(reader)
            with cursor.copy("COPY floor_t (user_id, email) FROM STDIN") as copy:
                for row in reader:
                    copy.write_row(row)
        pg.commit()
        seconds = time.perf_counter() - start
        pg.execute("DROP TABLE floor_t")
        pg.commit()
    return seconds


def naive_baseline(folder: Path, old: Path, new: Path) -> tuple[float, float]:
    """Seconds and peak MB of a Python process that loads both snapshots and diffs them."""
    run = run_child(folder, [sys.executable, "-c", NAIVE_CODE, str(old), str(new)], tag="naive")
    data = json.loads(run.stdout)
    return float(data["seconds"]), float(data["maxrss_kb"]) / 1024


def measure_size(
    n: int,
    store: str,
    folder: Path,
    sources: tuple[Path, Path],
    expected: int,
    naive: tuple[float, float],
) -> SizeResult:
    """Initial sync, 1% churn and no-change runs of ``n`` members on ``store``, and the floor."""
    v0, v1 = sources
    result = SizeResult(n=n, store=store, churn_expected=expected)
    result.naive_s, result.naive_peak_mb = naive
    batch = BATCH_SIZE if batch_supported() else None
    result.batch_size = batch
    source = folder / "members.csv"
    with state_store(store, folder) as url, FakeGist(api_key=API_KEY) as gist:
        config = write_config(
            folder / f"bench-{store}.toml", url, gist.url, source,
            requests_per_second=100_000, max_concurrency=16, batch_size=batch,
        )  # fmt: skip
        cfg = ["--config", str(config)]
        copy_source(v0, source)  # the config check wants the file to exist
        run_cli(folder, ["db", "upgrade", *cfg])
        say(f"{store} N={n:,}: initial sync")
        initial = run_cli(folder, ["run", *cfg, "--json"], tag="initial")
        result.initial_cli_s, result.initial_rss_mb = initial.seconds, initial.peak_rss_mb
        sent = sent_since_clear(gist)
        result.initial_sent = sent.contact_updates
        done = run_results(initial)
        if done[0].get("status") != "succeeded" or done[0].get("delivered") != n:
            raise BenchError(f"initial sync did not deliver all {n}: {done}")
        result.initial_s = engine_seconds(last_run(folder, config), "run")

        copy_source(v1, source)
        say(f"{store} N={n:,}: churn load + diff (dry run)")
        dry = run_cli(folder, ["run", *cfg, "--dry-run", "--quiet"], tag="churn-dry")
        result.churn_cli_s, result.churn_rss_mb = dry.seconds, dry.peak_rss_mb
        recorded = last_run(folder, config)
        result.churn_s = engine_seconds(recorded, "dry-run")
        result.churn_planned = int(recorded["entered"]) + int(recorded["exited"])
        say(f"{store} N={n:,}: churn real run")
        real = run_cli(folder, ["run", *cfg, "--json"], tag="churn-real")
        result.churn_real_cli_s = real.seconds
        sent = sent_since_clear(gist)
        result.churn_real_s = engine_seconds(last_run(folder, config), "run")
        result.churn_http_requests = sent.http_requests
        result.churn_sent = sent.contact_updates
        result.churn_distinct = sent.distinct_users
        result.churn_match = sent.contact_updates == expected and sent.distinct_users == expected

        say(f"{store} N={n:,}: no-change load + diff (dry run) and real run")
        dry = run_cli(folder, ["run", *cfg, "--dry-run", "--quiet"], tag="same-dry")
        result.nochange_cli_s, result.nochange_rss_mb = dry.seconds, dry.peak_rss_mb
        recorded = last_run(folder, config)
        result.nochange_s = engine_seconds(recorded, "dry-run")
        result.nochange_planned = int(recorded["entered"]) + int(recorded["exited"])
        run_cli(folder, ["run", *cfg, "--json"], tag="same-real")
        result.nochange_sent = sent_since_clear(gist).http_requests
        engine_seconds(last_run(folder, config), "run")  # it must have succeeded

        say(f"{store} N={n:,}: floor (csv.reader + bulk insert)")
        result.floor_s = floor_seconds(store, url, v1)
    result.floor_rows_per_s = n / result.floor_s
    result.churn_ratio = result.churn_s / result.floor_s
    result.nochange_ratio = result.nochange_s / result.floor_s
    result.churn_rows_per_s = n / result.churn_s
    return result


def measure_delivery(store: str, root: Path, changes: int, latency: float) -> DeliveryResult:
    """changes/s of a first sync of ``changes`` members at the fake's ``latency``."""
    result = DeliveryResult(store=store, latency_s=latency, changes=changes)
    concurrency = 8
    if latency > 0:
        result.target_per_s = concurrency / latency
    with tempfile.TemporaryDirectory(prefix="bench-delivery-", dir=root) as tmp:
        folder = Path(tmp)
        source = folder / "members.csv"
        write_source(source, changes)
        with state_store(store, folder) as url, FakeGist(api_key=API_KEY) as gist:
            gist.latency = latency
            config = write_config(
                folder / "bench.toml", url, gist.url, source,
                requests_per_second=100_000, max_concurrency=concurrency,
            )  # fmt: skip
            cfg = ["--config", str(config)]
            run_cli(folder, ["db", "upgrade", *cfg])
            dry = run_cli(folder, ["run", *cfg, "--dry-run", "--quiet"], tag="dry")
            result.dry_s = engine_seconds(last_run(folder, config), "dry-run")
            real = run_cli(folder, ["run", *cfg, "--json"], tag="real")
            sent = sent_since_clear(gist)
            delivered = int(run_results(real)[0].get("delivered") or 0)
            if delivered != changes:
                raise BenchError(f"delivered {delivered} of {changes}")
            result.real_s = engine_seconds(last_run(folder, config), "run")
    result.dry_cli_s, result.real_cli_s = dry.seconds, real.seconds
    result.delivery_s = max(result.real_s - result.dry_s, 0.001)
    result.changes_per_s = changes / result.delivery_s
    if sent.first_ok_at is not None and sent.last_ok_at is not None:
        span = sent.last_ok_at - sent.first_ok_at
        if span > 0:
            result.fake_span_per_s = (sent.status_counts.get("200", 0) - 1) / span
    if result.target_per_s:
        result.share_of_target = result.changes_per_s / result.target_per_s
    return result


def measure_rate(store: str, root: Path, seconds: float, limit: float = 50.0) -> RateResult:
    """Run ``limit x seconds`` changes against a fake that answers 429 above ``limit``/s."""
    changes = max(10, round(limit * seconds))
    result = RateResult(store=store, limit_per_s=limit, changes=changes)
    with tempfile.TemporaryDirectory(prefix="bench-rate-", dir=root) as tmp:
        folder = Path(tmp)
        source = folder / "members.csv"
        write_source(source, changes)
        with state_store(store, folder) as url, FakeGist(api_key=API_KEY) as gist:
            gist.rate_limit = limit
            config = write_config(
                folder / "bench.toml", url, gist.url, source,
                requests_per_second=limit, max_concurrency=8,
            )  # fmt: skip
            cfg = ["--config", str(config)]
            run_cli(folder, ["db", "upgrade", *cfg])
            run_cli(folder, ["run", *cfg, "--json"], tag="rate")
            sent = sent_since_clear(gist)
    result.ok_answers = sent.status_counts.get("200", 0)
    result.answers_429 = sent.status_counts.get("429", 0)
    if sent.first_ok_at is not None and sent.last_ok_at is not None:
        span = sent.last_ok_at - sent.first_ok_at
        if span > 0:
            result.achieved_per_s = (result.ok_answers - 1) / span
            result.share = result.achieved_per_s / limit
    return result


# ---------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    version = subprocess.run(
        [sys.executable, "--version"], capture_output=True, text=True, check=False
    )
    startups = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "audience_sync", "--version"], capture_output=True, check=False
        )
        startups.append(time.perf_counter() - start)
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": (version.stdout or version.stderr).strip(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg_version(),
        "cli_startup_s": statistics.median(startups),
        "batch_delivery": batch_supported(),
        "peak_rss_via": "/usr/bin/time -f %M" if os.access(TIME_BIN, os.X_OK) else "VmHWM poll",
    }


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def size_table(results: Sequence[SizeResult]) -> str:
    headers = [
        "N", "store", "floor s", "floor rows/s", "churn s", "ratio", "cli s", "no-chg s",
        "ratio", "cli s", "rows/s", "RSS MB", "sent/expected", "match", "no-chg req",
        "naive s", "naive MB", "initial s",
    ]  # fmt: skip
    rows = []
    notes = []
    for r in results:
        if r.skipped or r.error:
            notes.append(f"N={r.n:,} {r.store}: " + (r.skipped or f"ERROR: {r.error}"))
            word = "skipped" if r.skipped else "ERROR"
            rows.append([f"{r.n:,}", r.store, word, *["-"] * (len(headers) - 3)])
            continue
        rows.append(
            [
                f"{r.n:,}", r.store, fmt(r.floor_s, ".2f"), fmt(r.floor_rows_per_s, ",.0f"),
                fmt(r.churn_s, ".2f"), fmt(r.churn_ratio, ".2f"), fmt(r.churn_cli_s, ".2f"),
                fmt(r.nochange_s, ".2f"), fmt(r.nochange_ratio, ".2f"),
                fmt(r.nochange_cli_s, ".2f"), fmt(r.churn_rows_per_s, ",.0f"),
                fmt(r.churn_rss_mb, ".0f"), f"{fmt(r.churn_sent)}/{fmt(r.churn_expected)}",
                fmt(r.churn_match), fmt(r.nochange_sent), fmt(r.naive_s, ".2f"),
                fmt(r.naive_peak_mb, ".0f"), fmt(r.initial_s, ".1f"),
            ]
        )  # fmt: skip
    return "\n".join([table(headers, rows), *(f"  {note}" for note in notes)])


def delivery_table(results: Sequence[DeliveryResult]) -> str:
    headers = [
        "store", "latency ms", "changes", "dry s", "real s", "delivery s", "changes/s",
        "fake-side/s", "target/s", "% of target", "real cli s",
    ]  # fmt: skip
    rows = [
        [
            r.store, fmt(r.latency_s * 1000, ".0f"), fmt(r.changes),
            fmt(r.dry_s, ".3f"), fmt(r.real_s, ".3f"), fmt(r.delivery_s, ".3f"),
            fmt(r.changes_per_s, ",.0f"), fmt(r.fake_span_per_s, ",.0f"),
            fmt(r.target_per_s, ".0f"),
            fmt(None if r.share_of_target is None else r.share_of_target * 100, ".0f"),
            fmt(r.real_cli_s, ".2f"),
        ]
        if not r.error
        else [r.store, fmt(r.latency_s * 1000, ".0f"), f"ERROR: {r.error}"[:60], *[""] * 8]
        for r in results
    ]  # fmt: skip
    return table(headers, rows)


def rate_table(results: Sequence[RateResult]) -> str:
    headers = ["store", "limit/s", "changes", "200s", "429s", "achieved/s", "% of limit"]
    rows = [
        [
            r.store, fmt(r.limit_per_s, ".0f"), fmt(r.changes), fmt(r.ok_answers),
            fmt(r.answers_429), fmt(r.achieved_per_s, ".1f"),
            fmt(None if r.share is None else r.share * 100, ".1f"),
        ]
        if not r.error
        else [r.store, fmt(r.limit_per_s, ".0f"), f"ERROR: {r.error}"[:60], *[""] * 4]
        for r in results
    ]  # fmt: skip
    return table(headers, rows)


def derive_checks(
    sizes: Sequence[SizeResult], deliveries: Sequence[DeliveryResult], rates: Sequence[RateResult]
) -> list[Check]:
    checks: list[Check] = []
    ok = [r for r in sizes if r.skipped is None and r.error is None]
    for r in sizes:
        if r.error:
            checks.append(Check(f"N={r.n:,} {r.store} measured", False, r.error[:200]))
    for r in ok:
        where = f"N={r.n:,} {r.store}"
        checks.append(
            Check(
                f"{where}: churn load+diff <= 2.0 x floor",
                (r.churn_ratio or INF) <= 2.0,
                f"{r.churn_s:.2f} s / {r.floor_s:.2f} s = {r.churn_ratio:.2f}",
            )
        )
        checks.append(
            Check(
                f"{where}: no-change load+diff <= 1.2 x floor",
                (r.nochange_ratio or INF) <= 1.2,
                f"{r.nochange_s:.2f} s / {r.floor_s:.2f} s = {r.nochange_ratio:.2f}",
            )
        )
        rss = r.churn_rss_mb
        checks.append(
            Check(
                f"{where}: churn peak RSS <= 250 MB",
                rss is not None and rss <= 250,
                f"{fmt(rss, '.0f')} MB",
            )
        )
        checks.append(
            Check(
                f"{where}: churn sends one update per changed user",
                bool(r.churn_match),
                f"{r.churn_sent} updates in {r.churn_http_requests} requests, "
                f"{r.churn_distinct} distinct users, expected {r.churn_expected} "
                f"(dry run planned {r.churn_planned})",
            )
        )
        checks.append(
            Check(
                f"{where}: no-change run sends nothing",
                r.nochange_sent == 0 and r.nochange_planned == 0,
                f"{r.nochange_sent} requests, dry run planned {r.nochange_planned}",
            )
        )
    for store in sorted({r.store for r in ok}):
        mine = sorted((r for r in ok if r.store == store), key=lambda r: r.n)
        small_rss = mine[0].churn_rss_mb if mine else None
        big_rss = mine[-1].churn_rss_mb if mine else None
        if len(mine) >= 2 and small_rss and big_rss:
            small, big = mine[0], mine[-1]
            checks.append(
                Check(
                    f"{store}: RSS(N={big.n:,}) <= 1.2 x RSS(N={small.n:,})",
                    big_rss <= 1.2 * small_rss,
                    f"{big_rss:.0f} MB vs {small_rss:.0f} MB (x {big_rss / small_rss:.2f})",
                )
            )
        by_n = {r.n: r for r in mine}
        if 1_000_000 in by_n and 5_000_000 in by_n:
            one = by_n[1_000_000].churn_s or float("nan")
            five = by_n[5_000_000].churn_s or float("nan")
            checks.append(
                Check(
                    f"{store}: churn time(5M) / time(1M) <= 5.5",
                    five / one <= 5.5,
                    f"{five:.2f} s / {one:.2f} s = {five / one:.2f}",
                )
            )
    for d in deliveries:
        if d.error:
            checks.append(
                Check(f"{d.store}: delivery at {d.latency_s * 1000:.0f} ms", False, d.error)
            )
        elif d.target_per_s and d.share_of_target is not None:
            checks.append(
                Check(
                    f"{d.store}: delivery at {d.latency_s * 1000:.0f} ms >= 80% of "
                    f"max_concurrency / latency",
                    d.share_of_target >= 0.8,
                    f"{d.changes_per_s:.0f}/s of {d.target_per_s:.0f}/s = {d.share_of_target:.0%}",
                )
            )
    for q in rates:
        if q.error:
            checks.append(Check(f"{q.store}: rate-limit hold", False, q.error))
            continue
        share = q.share or 0.0
        checks.append(
            Check(
                f"{q.store}: rate-limit hold >= 95% of {q.limit_per_s:.0f}/s with 0 x 429",
                share >= 0.95 and q.answers_429 == 0,
                f"{fmt(q.achieved_per_s, '.1f')}/s = {share:.1%}, {q.answers_429} x 429",
            )
        )
    return checks


# --------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sizes", type=parse_sizes, default=parse_sizes("100000,1000000,5000000"),
        help="comma-separated member counts N (default 100000,1000000,5000000)",
    )  # fmt: skip
    parser.add_argument(
        "--stores", type=parse_stores, default=["sqlite", "postgresql"],
        help="comma-separated state stores: sqlite, postgresql (default both)",
    )  # fmt: skip
    parser.add_argument(
        "--delivery-changes", type=int, default=2000,
        help="changes sent by each delivery-throughput run (default 2000)",
    )  # fmt: skip
    parser.add_argument(
        "--rate-seconds", type=float, default=30.0,
        help="length of the rate-limit hold run at 50/s (default 30 s = 1500 changes)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the churned snapshot")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench-out" / "results.json",
        help="where to write the results as JSON (default bench-out/results.json)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stores: list[str] = list(args.stores)
    notes: list[str] = []
    if "postgresql" in stores and (problem := postgres_problem()) is not None:
        notes.append(f"postgresql skipped: {problem}")
        stores.remove("postgresql")
    for note in notes:
        say(note)
    say("machine info")
    machine = machine_info()
    if not machine["batch_delivery"]:
        notes.append(
            "batch delivery (gist.batch_size) is not supported by this version: initial syncs "
            f"send one request per member, so sizes above {NO_BATCH_MAX_N:,} are skipped"
        )
    sizes: list[SizeResult] = []
    deliveries: list[DeliveryResult] = []
    rates: list[RateResult] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        root = Path(tmp)
        for n in args.sizes:
            if not machine["batch_delivery"] and n > NO_BATCH_MAX_N:
                reason = "initial sync skipped for lack of batch delivery (gist.batch_size)"
                say(f"N={n:,}: {reason}")
                sizes += [SizeResult(n=n, store=s, skipped=reason) for s in stores]
                continue
            folder = root / f"n{n}"
            folder.mkdir()
            say(f"N={n:,}: writing sources")
            v0, v1 = folder / "v0.csv", folder / "v1.csv"
            write_source(v0, n)
            expected = write_source(v1, n, seed=args.seed + n)
            say(f"N={n:,}: naive baseline")
            naive = naive_baseline(folder, v0, v1)
            for store in stores:
                store_folder = folder / store
                store_folder.mkdir()
                try:
                    result = measure_size(n, store, store_folder, (v0, v1), expected, naive)
                except BenchError as exc:
                    say(f"{store} N={n:,}: FAILED: {exc}")
                    result = SizeResult(
                        n=n, store=store, churn_expected=expected, error=str(exc),
                        error_detail=exc.detail,
                    )  # fmt: skip
                sizes.append(result)
                shutil.rmtree(store_folder, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
        for store in stores:
            for latency in (0.0, 0.05):
                say(f"{store}: delivery throughput at {latency * 1000:.0f} ms latency")
                try:
                    deliveries.append(measure_delivery(store, root, args.delivery_changes, latency))
                except BenchError as exc:
                    deliveries.append(DeliveryResult(store, latency, error=str(exc)))
            say(f"{store}: rate-limit hold for ~{args.rate_seconds:.0f} s")
            try:
                rates.append(measure_rate(store, root, args.rate_seconds))
            except BenchError as exc:
                rates.append(RateResult(store, 50.0, error=str(exc)))
    checks = derive_checks(sizes, deliveries, rates)
    elapsed = time.perf_counter() - started
    report = {
        "machine": machine,
        "params": {
            "sizes": args.sizes,
            "stores": stores,
            "delivery_changes": args.delivery_changes,
            "rate_seconds": args.rate_seconds,
            "seed": args.seed,
            "elapsed_s": elapsed,
        },
        "notes": notes,
        "sizes": [asdict(r) for r in sizes],
        "delivery": [asdict(d) for d in deliveries],
        "rate": [asdict(q) for q in rates],
        "checks": [asdict(c) for c in checks],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_report(machine, notes, sizes, deliveries, rates, checks, elapsed, args.out)
    return 0 if all(c.passed for c in checks) else 1


def print_report(
    machine: dict[str, Any],
    notes: Sequence[str],
    sizes: Sequence[SizeResult],
    deliveries: Sequence[DeliveryResult],
    rates: Sequence[RateResult],
    checks: Sequence[Check],
    elapsed: float,
    out: Path,
) -> None:
    print(
        f"\nMachine: {machine['platform']}, {machine['cpu_count']} CPUs, {machine['python']}, "
        f"SQLite {machine['sqlite']}, PostgreSQL {machine['postgresql'] or 'n/a'}; "
        f"CLI startup {machine['cli_startup_s']:.2f} s; batch delivery "
        f"{'yes' if machine['batch_delivery'] else 'no'}; peak RSS via {machine['peak_rss_via']}"
    )
    for note in notes:
        print(f"Note: {note}")
    print(
        "\nLoad + diff (1% churn, no change) vs the floor; churn s / no-chg s are the engine's "
        "own time (finished_at - started_at of the dry run), cli s the CLI process:\n"
    )
    print(size_table(sizes))
    print(
        "\nDelivery throughput (max_concurrency 8; dry s / real s: finished_at - started_at, "
        "delivery s = real s - dry s):\n"
    )
    print(delivery_table(deliveries) if deliveries else "(none)")
    print("\nRate-limit hold:\n")
    print(rate_table(rates) if rates else "(none)")
    print("\nChecks:\n")
    for check in checks:
        print(f"  {'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
    passed = sum(c.passed for c in checks)
    print(f"\n{passed} of {len(checks)} checks passed in {elapsed:.0f} s; JSON: {out}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
