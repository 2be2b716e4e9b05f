"""Reading Gist back: ``reconcile`` of N contacts against the fake Gist at a rate limit.

For each size, a fake Gist preloaded with N contacts (half of them members of the audience, as
Segment's destination left them), a SQLite state and the audience's source file; the reconcile
runs in this process. The floor is what the rate limit allows: pages ÷ requests per second.
Prints a table and one JSON line per size:

    python benchmarks/bench_reconcile.py                              # 100k, at 10/s
    python benchmarks/bench_reconcile.py --sizes 100000,1000000 --rate 10
    python benchmarks/bench_reconcile.py --sizes 1000000 --rate 100 --per-page 100

``ratio`` is the wall time over the floor (1.00 is the rate limit itself). The fake gives at
most 100 contacts a page, as Gist is assumed to.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from audience_sync.config import load_settings
from audience_sync.db import make_engine, upgrade
from audience_sync.fakegist import MAX_PER_PAGE, FakeGist
from audience_sync.reconcile import reconcile
from harness import API_KEY


def measure(size: int, args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-reconcile-") as folder,
        FakeGist(api_key=API_KEY) as gist,
    ):
        root = Path(folder)
        started = time.monotonic()
        for n in range(size):
            member = n % 2 == 0
            gist.add_contact(f"u{n}", f"u{n}@example.com", {"vip": True} if member else {})
        loaded = time.monotonic() - started
        source = root / "vip.jsonl"
        with source.open("w") as handle:
            for n in range(0, size, 2):
                handle.write(json.dumps({"user_id": f"u{n}", "email": f"u{n}@example.com"}) + "\n")
        config = root / "audience_sync.toml"
        config.write_text(
            "\n".join(
                [
                    "[state]",
                    f'url = "sqlite:///{root / "state.db"}"',
                    "[gist]",
                    'api_key = "${GIST_API_KEY}"',
                    f'base_url = "{gist.url}"',
                    f"requests_per_second = {args.rate}",
                    "[[audiences]]",
                    'name = "VIP"',
                    'key = "vip"',
                    'file = "vip.jsonl"',
                ]
            )
            + "\n"
        )
        settings = load_settings(config, {"GIST_API_KEY": API_KEY})
        engine = make_engine(settings.state.url)
        upgrade(engine)
        gist.clear_log()
        started = time.monotonic()
        report = reconcile(settings, engine, per_page=args.per_page)
        wall = time.monotonic() - started
        engine.dispose()
        [result] = report.results
        requests = len(gist.requests())
    pages = -(-size // min(args.per_page, MAX_PER_PAGE))
    floor = pages / args.rate
    return {
        "scenario": "reconcile",
        "contacts": size,
        "per_page": args.per_page,
        "rate": args.rate,
        "requests": requests,
        "pages": report.pages,
        "members_found": result.members,
        "differences": result.entered + result.exited + result.resent,
        "wall_s": round(wall, 2),
        "floor_s": round(floor, 2),
        "ratio": round(wall / floor, 3),
        "preload_s": round(loaded, 1),
        "status": result.status,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000", help="contacts, comma-separated")
    parser.add_argument("--rate", type=float, default=10.0, help="gist.requests_per_second")
    parser.add_argument("--per-page", type=int, default=100)
    args = parser.parse_args(argv)
    rows = [measure(int(size), args) for size in args.sizes.split(",")]
    print(f"{'contacts':>9} {'pages':>6} {'requests':>8} {'wall s':>8} {'floor s':>8} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['contacts']:>9} {row['pages']:>6} {row['requests']:>8} {row['wall_s']:>8} "
            f"{row['floor_s']:>8} {row['ratio']:>6}"
        )
    for row in rows:
        print(json.dumps(row))
    return 0 if all(row["status"] == "succeeded" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
