"""The history pages on a big state: each page's server time at 1M memberships and 10k runs.

Builds a state database in SQL (seconds; the runs' counts are made up, their shape is a
real history's): ``--audiences`` audiences sharing ``--memberships`` members among 200k
users (more when an audience is bigger), ``--runs`` runs of them (the first of each
audience sent every member, each later one ~50 changes, some refused, some dry runs), 2
rejected rows a run, one contact per user, workers and a shared rate limit. Then serves
the pages read-only on loopback, as ``audience-sync ui`` does, asks each ``--repeat``
times and prints the server time each took (its ``Server-Timing`` header: routing,
queries, template), median and worst, against the 300 ms target:

    python benchmarks/bench_ui.py                          # SQLite, 1M memberships, 10k runs
    python benchmarks/bench_ui.py --store postgresql       # a fresh schema in database test
    python benchmarks/bench_ui.py --audiences 1            # one audience of 1M: 1M-change run
    python benchmarks/bench_ui.py --memberships 100000 --runs 1000 --repeat 3

One JSON line per page follows the table. Exit 1 when a page's worst time passes the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from audience_sync import db
from audience_sync.web.app import create_app
from audience_sync.web.serve import background
from audience_sync.web.state import read_only_engine

TARGET_MS = 300.0
USERS = 200_000
CHANGES_PER_RUN = 50
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def series(dialect: str, count: int) -> str:
    """A SELECT of ``n`` from 0 to ``count - 1``."""
    if dialect == "postgresql":
        return f"SELECT generate_series(0, {count - 1}) AS n"
    return (
        f"WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s WHERE n < {count - 1}) "
        "SELECT n FROM s"
    )


def at(dialect: str, minutes: str) -> str:
    """A timestamp ``minutes`` (an SQL expression) after 2026-01-01."""
    if dialect == "postgresql":
        return f"(TIMESTAMP '2026-01-01 00:00:00' + ({minutes}) * INTERVAL '1 minute')"
    return f"datetime('2026-01-01 00:00:00', '+' || ({minutes}) || ' minutes')"


def build(engine: Engine, audiences: int, members: int, runs: int) -> dict[str, Any]:
    """Fill a migrated state database; returns the ids and keys the pages are asked about."""
    d = engine.dialect.name
    per_audience = members // audiences
    users = max(USERS, per_audience)  # an audience's members are distinct users
    big = min(7, audiences - 1)  # the audience the pages are asked about
    # Run r belongs to audience r % audiences; runs 1..audiences are each one's first run.
    statements = [
        f"""INSERT INTO audiences (key, name, source, kind, first_synced_at, last_synced_at)
        SELECT 'aud_' || n, 'Audience ' || n, 'file members_' || n || '.csv', 'audience',
               {at(d, "n")}, {at(d, f"{runs} * 10")}
        FROM ({series(d, audiences)}) s""",
        f"""INSERT INTO sync_runs (id, audience_key, kind, status, started_at, finished_at,
            source_rows, members, entered, exited, delivered, failed, rejected, resent,
            email_conflicts, fast_path)
        SELECT n + 1, 'aud_' || (n % {audiences}),
               CASE WHEN n % 97 = 5 THEN 'dry-run' ELSE 'run' END,
               CASE WHEN n % 41 = 3 THEN 'partial' WHEN n % 113 = 7 THEN 'failed'
                    ELSE 'succeeded' END,
               {at(d, "n * 10")}, {at(d, "n * 10 + 2")},
               {per_audience + 2}, {per_audience},
               CASE WHEN n < {audiences} THEN {per_audience} ELSE {CHANGES_PER_RUN // 2} END,
               CASE WHEN n < {audiences} THEN 0 ELSE {CHANGES_PER_RUN // 2} END,
               CASE WHEN n < {audiences} THEN {per_audience} ELSE {CHANGES_PER_RUN - 1} END,
               CASE WHEN n < {audiences} THEN 0 ELSE 1 END, 2, 0, 0, false
        FROM ({series(d, runs)}) s""",
        # Audience a holds users (a * 5000 + j) mod 200k, j < per_audience: users overlap.
        f"""INSERT INTO memberships (audience_key, user_id, email, since, last_run_id)
        SELECT 'aud_' || (n / {per_audience}),
               'u' || (((n / {per_audience}) * 5000 + n % {per_audience}) % {users}),
               'u' || (((n / {per_audience}) * 5000 + n % {per_audience}) % {users})
                   || '@example.com',
               {at(d, "n / " + str(per_audience))}, n / {per_audience} + 1
        FROM ({series(d, per_audience * audiences)}) s""",
        # Each audience's first run sent every member true.
        f"""INSERT INTO member_changes (run_id, audience_key, user_id, email, value, status,
            attempts, http_status, delivered_at)
        SELECT audience_key_n + 1, 'aud_' || audience_key_n, 'u' || u, 'u' || u || '@example.com',
               true, 'delivered', 1, 200, {at(d, "audience_key_n * 10 + 1")}
        FROM (SELECT n / {per_audience} AS audience_key_n,
                     ((n / {per_audience}) * 5000 + n % {per_audience}) % {users} AS u
              FROM ({series(d, per_audience * audiences)}) s) m""",
        # Every later run: CHANGES_PER_RUN changes, half in, half out, one refused.
        f"""INSERT INTO member_changes (run_id, audience_key, user_id, email, value, status,
            attempts, http_status, last_error, delivered_at)
        SELECT r + 1, 'aud_' || (r % {audiences}), 'u' || ((r * 7 + c * 3989) % {users}),
               'u' || ((r * 7 + c * 3989) % {users}) || '@example.com', c % 2 = 0,
               CASE WHEN c = 0 THEN 'failed' WHEN r % 97 = 5 THEN 'planned'
                    ELSE 'delivered' END,
               1, CASE WHEN c = 0 THEN 422 ELSE 200 END,
               CASE WHEN c = 0 THEN 'HTTP 422: Email is invalid' END,
               CASE WHEN c = 0 OR r % 97 = 5 THEN NULL ELSE {at(d, "r * 10 + 1")} END
        FROM (SELECT n / {CHANGES_PER_RUN} + {audiences} AS r, n % {CHANGES_PER_RUN} AS c
              FROM ({series(d, (runs - audiences) * CHANGES_PER_RUN)}) s) x""",
        f"""INSERT INTO rejected_rows (run_id, row_number, user_id, email, reason)
        SELECT n / 2 + 1, n % 2 + 1, 'x' || n, 'not-an-email', 'email is not valid'
        FROM ({series(d, runs * 2)}) s""",
        f"""INSERT INTO contacts (user_id, email, updated_at, last_run_id)
        SELECT 'u' || n, 'u' || n || '@example.com', {at(d, "1")}, 1
        FROM ({series(d, users)}) s""",
        f"""INSERT INTO uncertain_members (audience_key, user_id, email, run_id)
        SELECT 'aud_{big}', 'u' || (n * 11), 'u' || (n * 11) || '@example.com', {runs}
        FROM ({series(d, 30)}) s""",
        f"""INSERT INTO workers (id, host, pid, boot_id, command, started_at, heartbeat_at,
            stopped_at, running)
        SELECT 'host' || n || '/boot.ns:' || (1000 + n) || '-w', 'host' || n, 1000 + n, 'boot',
               CASE WHEN n < 3 THEN 'daemon' ELSE 'run' END, {at(d, "n")}, {at(d, "n + 5")},
               CASE WHEN n < 3 THEN NULL ELSE {at(d, "n + 5")} END,
               CASE WHEN n < 3 THEN 'aud_' || n END
        FROM ({series(d, 12)}) s""",
        "INSERT INTO rate_limits (workspace, next_free, claimed_at) "
        "VALUES ('0123456789abcdef0123456789abcdef', 0, 0)",
    ]
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))
        if d == "postgresql":
            # Ids were given explicitly: move the sequence past them, as real inserts would.
            connection.execute(
                text("SELECT setval(pg_get_serial_sequence('sync_runs', 'id'), :n)"), {"n": runs}
            )
    if d == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            # What autovacuum does after such a load (PostgreSQL 13+ vacuums after inserts too):
            # the visibility map lets counts over an index skip the table.
            connection.execute(text("VACUUM ANALYZE"))
    with engine.connect() as connection:
        # A cursor 150 changes before the end of the big first run: its last pages.
        deep_after = connection.scalar(
            text(
                "SELECT id FROM member_changes WHERE run_id = :r AND status <> 'failed' "
                "ORDER BY status, user_id, id LIMIT 1 OFFSET :n"
            ),
            {"r": big + 1, "n": max(per_audience - 150, 0)},
        )
    big_dry = next(r for r in range(audiences, runs) if r % 97 == 5) + 1
    return {
        "first_run": big + 1,  # its first run: every member sent
        "later_run": runs - 3,
        "dry_run": big_dry,
        "audience": f"aud_{big}",
        "user": "u40000",  # in eight audiences, changed by dozens of runs
        "deep_after": deep_after,
    }


def pages(facts: dict[str, Any], runs: int) -> list[tuple[str, str]]:
    """(name, path) of every page asked about: each route, its filters, first and deep pages."""
    first, audience = facts["first_run"], facts["audience"]
    return [
        ("runs", "/"),
        ("runs, last page", f"/?page={runs // 50}"),
        ("runs of an audience", f"/?audience={audience}"),
        ("runs, failed", "/?status=failed"),
        ("runs, dry runs, page 2", "/?kind=dry-run&page=2"),
        ("run, first sync (all members)", f"/runs/{first}"),
        ("run, first sync, exited (none)", f"/runs/{first}?changes=exited"),
        ("run, first sync, last pages", f"/runs/{first}?after={facts['deep_after']}"),
        ("run, a later one", f"/runs/{facts['later_run']}"),
        ("run, failed changes", f"/runs/{facts['later_run']}?changes=failed"),
        ("run, a dry run", f"/runs/{facts['dry_run']}"),
        ("audience", f"/audiences/{audience}"),
        ("user", f"/users/{facts['user']}"),
        ("user, unknown (404)", "/users/nobody"),
        ("workers", "/workers"),
    ]


@contextmanager
def state(store: str, folder: Path) -> Iterator[str]:
    if store == "sqlite":
        yield f"sqlite:///{folder / 'state.db'}"
        return
    schema = f"bench_ui_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, poolclass=NullPool)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_ADMIN}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--memberships", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--audiences", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-ui-") as folder,
        state(args.store, Path(folder)) as url,
    ):
        writer = db.make_engine(url)
        db.upgrade(writer)
        started = time.monotonic()
        facts = build(writer, args.audiences, args.memberships, args.runs)
        writer.dispose()
        print(
            f"built {args.store} state: {args.memberships:,} memberships, {args.runs:,} runs in "
            f"{time.monotonic() - started:.0f}s",
            file=sys.stderr,
        )
        engine = read_only_engine(url)
        results = []
        with background(create_app(engine)) as base, httpx.Client(base_url=base) as client:
            for name, path in pages(facts, args.runs):
                times, status = [], 0
                for _ in range(args.repeat + 1):  # the first warms the caches: not counted
                    answer = client.get(path)
                    status = answer.status_code
                    times.append(float(answer.headers["server-timing"].split("dur=")[1]))
                counted = times[1:]
                results.append(
                    {
                        "page": name,
                        "path": path,
                        "status": status,
                        "cold_ms": round(times[0], 1),
                        "median_ms": round(statistics.median(counted), 1),
                        "max_ms": round(max(counted), 1),
                        "store": args.store,
                        "memberships": args.memberships,
                        "runs": args.runs,
                    }
                )
        engine.dispose()
    width = max(len(r["page"]) for r in results)
    print(f"{'page':<{width}}  status  cold ms  median ms  max ms")
    for r in results:
        verdict = "" if r["max_ms"] <= TARGET_MS else f"  over {TARGET_MS:g} ms"
        print(
            f"{r['page']:<{width}}  {r['status']:>6}  {r['cold_ms']:>7}  {r['median_ms']:>9}  "
            f"{r['max_ms']:>6}{verdict}"
        )
    for r in results:
        print(json.dumps(r))
    return 0 if all(r["max_ms"] <= TARGET_MS for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
