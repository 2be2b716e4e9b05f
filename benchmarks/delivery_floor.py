"""The delivery floor: a bare httpx client sending ``N`` contact updates with ``CONCURRENCY``
workers, each one ``POST /contacts`` after another on a shared keep-alive pool, and nothing
else (no pacing, retries, state or acknowledgements). No deliverer built on httpx sends
faster against the same Gist from the same machine, so the engine's delivery rate is read
against it as well as against ``concurrency / latency``, which no client reaches: every
request also pays both ends' processing and the wake-ups between them.

Run as a child, like the CLI it is compared with: ``python delivery_floor.py URL KEY N
CONCURRENCY``; prints ``{"seconds": …, "per_s": …}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx

from audience_sync.gist import build_contact


async def deliver(url: str, key: str, n: int, concurrency: int) -> float:
    """Seconds to send ``n`` updates with ``concurrency`` workers."""
    pending = iter(range(n))
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {key}", "Accept": "application/json"},
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    ) as client:

        async def worker() -> None:
            for i in pending:
                body = build_contact(f"floor-{i}", f"floor-{i}@example.com", {"bench": True})
                response = await client.post("/contacts", json=body)
                response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


def main() -> None:
    url, key, n, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    seconds = asyncio.run(deliver(url, key, n, concurrency))
    print(json.dumps({"seconds": seconds, "per_s": n / seconds}))


if __name__ == "__main__":
    main()
