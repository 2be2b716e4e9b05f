"""Aggregate delivery of N daemons against one Gist rate limit (issue 13's figure).

For each daemon count, a fresh state (a PostgreSQL schema, or a SQLite file), a fake Gist
limiting at ``--rate`` requests per second with ``--latency`` per answer, ``--audiences``
audiences of ``--members`` members each, every daemon's ``gist.requests_per_second`` set
to that same rate; the daemons start together and the clock runs from the fake's first
answer to its last. Prints one table and one JSON line per daemon count:

    python benchmarks/bench_fleet.py                       # 1 and 3 daemons, PostgreSQL
    python benchmarks/bench_fleet.py --daemons 1,2,3 --store sqlite --rate 100

``share`` is answered requests per second over the limit (target: ≥ 0.95 and never above
it), ``busiest 1s`` the most answers in any one-second window, ``429`` how many requests the
fake refused for the rate.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from audience_sync.fakegist import FakeGist
from harness import API_KEY, PG_CONNINFO, PG_URL, paused_gc


def write_config(folder: Path, state: list[str], gist_url: str, args: argparse.Namespace) -> Path:
    lines = [
        "[state]", *state,
        "[gist]", 'api_key = "${GIST_API_KEY}"', f'base_url = "{gist_url}"',
        f"requests_per_second = {args.rate}", f"max_concurrency = {args.concurrency}",
        "timeout_seconds = 10", "max_retries = 5",
    ]  # fmt: skip
    for n in range(args.audiences):
        source = folder / f"{n}.jsonl"
        source.write_text(
            "".join(
                json.dumps({"user_id": f"a{n}-{i}", "email": f"a{n}-{i}@example.com"}) + "\n"
                for i in range(args.members)
            )
        )
        lines += ["[[audiences]]", f'name = "Fleet {n}"', f'file = "{source.name}"', 'every = "1h"']
    config = folder / "audience_sync.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def measure(daemons: int, args: argparse.Namespace) -> dict[str, Any]:
    schema = f"bench_fleet_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "GIST_API_KEY": API_KEY}
    total = args.audiences * args.members
    with tempfile.TemporaryDirectory() as tmp, paused_gc(), FakeGist(api_key=API_KEY) as gist:
        folder = Path(tmp)
        gist.rate_limit = args.rate
        gist.latency = args.latency
        if args.store == "postgresql":
            state = [f'url = "{PG_URL}"', f'schema = "{schema}"']
        else:
            state = [f'url = "sqlite:///{folder / "state.db"}"']
        config = write_config(folder, state, gist.url, args)
        cli = [sys.executable, "-m", "audience_sync"]
        upgrade = [*cli, "db", "upgrade", "--config", str(config)]
        subprocess.run(upgrade, env=env, check=True)  # noqa: S603
        processes = [
            subprocess.Popen(  # noqa: S603
                [*cli, "daemon", "--config", str(config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=(folder / f"daemon{i}.log").open("w"),
            )
            for i in range(daemons)
        ]
        try:
            deadline = time.monotonic() + args.timeout
            while sum(1 for r in gist.requests("/contacts") if r.status == 200) < total:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{daemons} daemons: not done in {args.timeout}s")
                time.sleep(1.0)  # reading the log holds the fake's lock: not too often
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=60)
            if args.store == "postgresql":
                with psycopg.connect(PG_CONNINFO, autocommit=True) as connection:
                    connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        requests = gist.requests()
        busiest = gist.busiest_second()
    answered = sorted(r.at for r in requests if r.status == 200)
    seconds = answered[-1] - answered[0]
    rate = (len(answered) - 1) / seconds if seconds > 0 else float("nan")
    return {
        "daemons": daemons,
        "store": args.store,
        "limit": args.rate,
        "latency_s": args.latency,
        "requests": len(answered),
        "seconds": round(seconds, 2),
        "rate": round(rate, 2),
        "share": round(rate / args.rate, 4),
        "busiest_1s": busiest,
        "rate_429": sum(1 for r in requests if r.status == 429),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemons", default="1,3", help="daemon counts to measure (1,3)")
    parser.add_argument("--store", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--rate", type=float, default=50.0, help="the limit, requests/s (50)")
    parser.add_argument("--latency", type=float, default=0.05, help="fake's answer time (0.05)")
    parser.add_argument("--concurrency", type=int, default=8, help="max_concurrency (8)")
    parser.add_argument("--audiences", type=int, default=6)
    parser.add_argument("--members", type=int, default=250, help="per audience (250)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    rows = [measure(int(n), args) for n in args.daemons.split(",")]
    header = ("daemons", "store", "limit", "requests", "seconds", "rate", "share",
              "busiest_1s", "rate_429")  # fmt: skip
    print("  ".join(f"{h:>10}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>10}" for h in header))
    for row in rows:
        print(json.dumps({"bench": "fleet", **row}))


if __name__ == "__main__":
    main()
