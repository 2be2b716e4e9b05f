"""Benchmark harness: CLI child processes with their time and peak RSS, state stores, seeded
sources, configs, the fake Gist's log and a baseline revision's CLI from a git worktree."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from audience_sync.fakegist import FakeGist, RecordedRequest

REPO = Path(__file__).resolve().parent.parent
API_KEY = "bench-fake-key"  # the fake Gist's key; never a real one
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# The same server under another name: a source URL that differs from state.url, so its rows
# take the regular path through Python even where a same-URL source would run in-database.
PG_OTHER_URL = "postgresql+psycopg://postgres@localhost:5432/test"
PG_CONNINFO = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
CHURN_SHARE = 0.005  # removed, and again added: 1% of members change
AUDIENCE_KEY = "bench"  # the property key of the audience named "Bench"
# The highest rate main's config accepts: never what limits a bench run (batches of 500).
REQUESTS_PER_SECOND = 10_000
# The mass-exit guard only looks at audiences with at least this many members: never here.
NO_MASS_EXIT_GUARD = 1_000_000_000
TIME_BIN = "/usr/bin/time"
Stat = Literal["median", "max"]


class BenchError(Exception):
    """A measurement could not be taken (a CLI run failed, a count was impossible)."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


@dataclass
class Samples:
    """Repeated figures of one measurement and the statistic that sums them up."""

    values: list[float] = field(default_factory=list)
    stat: Stat = "median"

    @property
    def value(self) -> float | None:
        """The median (timed figures) or the maximum (peaks) of the values; None if empty."""
        if not self.values:
            return None
        return statistics.median(self.values) if self.stat == "median" else max(self.values)

    def add(self, value: float | None) -> None:
        """Keep one more value (None, a figure that could not be read, is left out)."""
        if value is not None:
            self.values.append(value)


@dataclass
class CliRun:
    """One child process: wall time, peak RSS, output."""

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

    def ok_rate(self) -> float | None:
        """(200 answers - 1) / the time from the first to the last: the pace Gist saw."""
        ok = self.status_counts.get("200", 0)
        if self.first_ok_at is None or self.last_ok_at is None or ok < 2:
            return None
        span = self.last_ok_at - self.first_ok_at
        return (ok - 1) / span if span > 0 else None


def say(message: str) -> None:
    """Progress line on stderr, so stdout keeps only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ child processes


@dataclass(frozen=True)
class Cli:
    """An audience-sync CLI to run as ``python -m audience_sync``: this checkout's, or a
    baseline revision's put first on ``PYTHONPATH``."""

    name: str
    pythonpath: Path | None = None
    commit: str | None = None

    def run(
        self, folder: Path, args: Sequence[str], *, expect: Sequence[int] = (0,), tag: str = "cli"
    ) -> CliRun:
        """Run ``python -m audience_sync ARGS`` as a child; time it and take its peak RSS."""
        env = None
        if self.pythonpath is not None:
            env = {**os.environ, "PYTHONPATH": str(self.pythonpath)}
        command = [sys.executable, "-m", "audience_sync", *args]
        return run_child(folder, command, expect=expect, tag=f"{self.name}-{tag}", env=env)

    def has_flag(self, folder: Path, command: str, flag: str) -> bool:
        """Whether ``COMMAND --help`` lists ``flag`` (for flags newer than some revisions)."""
        key = (self.name, command, flag)
        if key not in _FLAGS:
            _FLAGS[key] = flag in self.run(folder, [command, "--help"], tag="help").stdout
        return _FLAGS[key]


_FLAGS: dict[tuple[str, str, str], bool] = {}


CURRENT = Cli("current")


def run_child(
    folder: Path,
    command: list[str],
    *,
    expect: Sequence[int] = (0,),
    tag: str = "child",
    env: Mapping[str, str] | None = None,
) -> CliRun:
    """Run ``command`` in ``folder``; wall time, peak RSS (``/usr/bin/time -f %M``, else
    ``VmHWM`` polled from /proc) and output. BenchError when the exit code is unexpected."""
    out_path, err_path = folder / f"{tag}.out", folder / f"{tag}.err"
    rss_path = folder / f"{tag}.rss"
    use_time = os.access(TIME_BIN, os.X_OK)
    full = [TIME_BIN, "-f", "%M", "-o", str(rss_path), *command] if use_time else command
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        process = subprocess.Popen(full, stdout=out, stderr=err, cwd=folder, env=env)  # noqa: S603
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


@contextmanager
def baseline_cli(rev: str, root: Path) -> Iterator[Cli]:
    """The CLI of revision ``rev``, from a temporary ``git worktree`` removed afterwards.

    Revisions with a ``src/`` layout run from ``src``; newer ones from the top level, where
    the build maps ``migrations/`` into the package, so the throwaway checkout gets a link.
    """
    resolved = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if resolved is None:
        raise BenchError(f"baseline revision {rev!r} is not in this repository's history")
    path = root / f"baseline-{resolved[:12]}"
    if _git("worktree", "add", "--detach", "--quiet", str(path), resolved) is None:
        raise BenchError(f"cannot create a git worktree of {rev} at {path}")
    try:
        if (path / "src" / "audience_sync").is_dir():
            pythonpath = path / "src"
        else:
            pythonpath = path
            inside = path / "audience_sync" / "migrations"
            if (path / "migrations").is_dir() and not inside.exists():
                inside.symlink_to(path / "migrations", target_is_directory=True)
        yield Cli("baseline", pythonpath, resolved)
    finally:
        _git("worktree", "remove", "--force", str(path))
        shutil.rmtree(path, ignore_errors=True)
        _git("worktree", "prune")


def _git(*args: str) -> str | None:
    """``git ARGS`` in this repository: its output, or None when it failed."""
    done = subprocess.run(  # noqa: S603
        ["git", "-C", str(REPO), *args],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def checkout_commit() -> dict[str, Any]:
    """The commit this checkout is at and whether its tree has changes, for the JSON lines."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


# ----------------------------------------------------------------------- the run records


def last_run(cli: Cli, folder: Path, config: Path) -> dict[str, Any]:
    """The newest run recorded in the state database (``history --json --limit 1``)."""
    run = cli.run(folder, ["history", "--config", str(config), "--json", "--limit", "1"])
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


def planned(recorded: dict[str, Any]) -> int:
    """Changes a recorded run planned: entered + exited."""
    return int(recorded.get("entered") or 0) + int(recorded.get("exited") or 0)


def run_results(run: CliRun) -> list[dict[str, Any]]:
    """The per-audience results a ``run --json`` printed."""
    try:
        return list(json.loads(run.stdout))
    except ValueError as exc:
        raise BenchError(f"run --json printed no JSON: {run.stdout[-500:]!r}") from exc


def source_rows(metrics_file: Path, audience: str = AUDIENCE_KEY) -> dict[str, float] | None:
    """``audience_sync_source_rows_total{audience, path}`` by path (``python``,
    ``database``) from a ``--metrics-file``; None when the CLI does not write that counter."""
    if not metrics_file.is_file():
        return None
    found: dict[str, float] | None = None
    for family in text_string_to_metric_families(metrics_file.read_text(encoding="utf-8")):
        for sample in family.samples:
            if sample.name != "audience_sync_source_rows_total":
                continue
            found = found if found is not None else {}
            if sample.labels.get("audience") == audience:
                path = sample.labels.get("path", "")
                found[path] = found.get(path, 0.0) + sample.value
    return found


# -------------------------------------------------------------------------- state stores


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
    """The server's version, or None when PostgreSQL cannot be used."""
    if postgres_problem() is not None:
        return None
    import psycopg

    with psycopg.connect(PG_CONNINFO) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else None


@contextmanager
def pg_schema(prefix: str = "bench") -> Iterator[str]:
    """A new PostgreSQL schema ``<prefix>_<hex>``, dropped with everything in it afterwards."""
    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_CONNINFO, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        with psycopg.connect(PG_CONNINFO, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextmanager
def state_store(store: str, folder: Path) -> Iterator[str]:
    """A fresh, empty state database URL: a SQLite file, or a new PostgreSQL schema (as the
    connections' search_path, which every revision honours)."""
    if store == "sqlite":
        path = folder / f"state-{uuid.uuid4().hex[:8]}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    with pg_schema() as schema:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"


def schema_of(state_url: str) -> str:
    """The schema of a PostgreSQL state URL made by ``state_store``."""
    return state_url.rsplit("%3D", 1)[1]


def pg_conninfo(state_url: str) -> str:
    """libpq connection string for a PostgreSQL state URL made by ``state_store``."""
    return f"{PG_CONNINFO} options=-csearch_path={schema_of(state_url)}"


# ------------------------------------------------------------------- sources and configs


def write_config(
    path: Path,
    state_url: str,
    gist_url: str,
    audience: Mapping[str, Any],
    *,
    max_concurrency: int,
    requests_per_second: float = REQUESTS_PER_SECOND,
    batch_size: int | None = None,
    sources: Mapping[str, str] | None = None,
) -> Path:
    """A config like tests/conftest.py's Workspace writes, for one audience ``Bench`` whose
    source is ``audience`` (``{"file": …}`` or ``{"source": …, "query": …}``)."""
    gist: dict[str, Any] = {
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
    entry = {"name": "Bench", **audience, "mass_exit_min_members": NO_MASS_EXIT_GUARD}
    lines = ["[state]", f"url = {json.dumps(state_url)}", "[gist]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in gist.items()]
    for name, url in (sources or {}).items():
        lines += [f"[sources.{name}]", f"url = {json.dumps(url)}"]
    lines.append("[[audiences]]")
    lines += [f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in entry.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def member_rows(n: int, *, seed: int | None = None) -> Iterator[tuple[str, str]]:
    """Members ``u0..u{n-1}`` with ``u{i}@example.com``; with ``seed``, the churned snapshot:
    0.5% of them removed and as many new members (``u{n}..``) added at random places."""
    removed: set[int] = set()
    added: dict[int, int] = {}
    if seed is not None:
        k = churn_count(n) // 2
        rng = random.Random(seed)
        removed = set(rng.sample(range(n), k))
        added = {pos: n + j for j, pos in enumerate(sorted(rng.sample(range(n), k)))}
    for i in range(n):
        if i not in removed:
            yield f"u{i}", f"u{i}@example.com"
        new = added.get(i)
        if new is not None:
            yield f"u{new}", f"u{new}@example.com"


def churn_count(n: int) -> int:
    """How many users change between ``n`` members and their churned snapshot."""
    return 2 * max(1, round(n * CHURN_SHARE))


def write_source(path: Path, n: int, *, seed: int | None = None) -> int:
    """Stream ``member_rows`` to a CSV (``user_id,email``); the changes it carries."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("user_id,email\n")
        lines: list[str] = []
        for user_id, email in member_rows(n, seed=seed):
            lines.append(f"{user_id},{email}\n")
            if len(lines) >= 10_000:
                handle.write("".join(lines))
                lines = []
        handle.write("".join(lines))
    return 0 if seed is None else churn_count(n)


def copy_source(source: Path, target: Path) -> None:
    """Replace the audience's file the way an export job would: write aside, then rename."""
    aside = target.with_suffix(".tmp")
    shutil.copyfile(source, aside)
    os.replace(aside, target)


@contextmanager
def scratch(root: Path, prefix: str) -> Iterator[Path]:
    """A temporary folder under ``root``, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=root) as tmp:
        yield Path(tmp)


# ---------------------------------------------------------------------------- fake Gist


def sent_since_clear(gist: FakeGist) -> Sent:
    """Summarise the fake's request log (contact updates counted per user carried), then
    clear it."""
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


@contextmanager
def fake_gist(*, latency: float = 0.0, rate_limit: float | None = None) -> Iterator[FakeGist]:
    """The loopback fake Gist, in this process, with this process's cyclic garbage collector
    paused while it serves (as ``timeit`` pauses it): the fake is the measuring instrument,
    and a full collection over its request log (~60 ms at ~1,000 logged requests) stalls
    every handler thread, so requests the client spaced arrive together and its rate limiter
    answers 429 for a burst the client never sent (measured: the client never over 50 in any
    1.0 s on the wire, the fake counting 53). Its objects hold no cycles, so nothing grows."""
    gist = FakeGist(api_key=API_KEY)
    gist.latency = latency
    gist.rate_limit = rate_limit
    with paused_gc(), gist:
        yield gist


@contextmanager
def paused_gc() -> Iterator[None]:
    """This process's cyclic garbage collector off for the block (see ``fake_gist``)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
