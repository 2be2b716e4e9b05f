"""The ledger's acknowledgement writes: lookups over as many outcomes as a save holds."""

from __future__ import annotations

from sqlalchemy import Engine, insert

from audience_sync import ledger
from audience_sync.models import contacts
from audience_sync.runs import utcnow


def test_a_save_looks_up_more_users_than_a_statement_takes_parameters(engine: Engine) -> None:
    # A save that waited on a slow state database holds every outcome that arrived meanwhile:
    # more users than PostgreSQL (65,535) or SQLite (32,766) takes parameters in a statement.
    users = [f"u{i}" for i in range(70_000)]
    now = utcnow()
    with engine.begin() as connection:
        connection.execute(
            insert(contacts),
            [{"user_id": u, "email": f"{u}@example.com", "updated_at": now, "last_run_id": 1}
             for u in users[::7_000]],
        )  # fmt: skip
        found = ledger._contact_emails(connection, users)
    assert found == {u: f"{u}@example.com" for u in users[::7_000]}
    assert [len(part) for part in ledger._parts(users)] == [10_000] * 7


def test_sending_waits_for_a_save_with_too_many_outcomes_behind_it() -> None:
    """The ack buffer's back-pressure: while a save runs and more than ``ACK_BACKLOG``
    outcomes wait behind it, ``keep_up`` waits for that save and starts the next; below the
    backlog it returns at once. Before: saves starved by a busy event loop grew with every
    one that followed, until a 1M delivery's lease heartbeat waited 30 s behind one."""
    import asyncio
    import threading

    release = threading.Event()
    saved: list[int] = []

    def save(items: list[int]) -> None:
        release.wait(5)
        saved.append(len(items))

    async def scenario() -> None:
        buffer: ledger.AckBuffer[int] = ledger.AckBuffer(save)
        for i in range(ledger.ACK_BATCH):
            buffer.add(i)
        buffer.flush_if_due()  # a save of ACK_BATCH starts and blocks
        for i in range(ledger.ACK_BACKLOG):
            buffer.add(i)
        await asyncio.wait_for(buffer.keep_up(), 1)  # not more than the backlog: no wait
        assert saved == []
        buffer.add(-1)
        waiting = asyncio.create_task(buffer.keep_up())
        await asyncio.sleep(0.1)
        assert not waiting.done()  # held behind the running save
        release.set()
        await asyncio.wait_for(waiting, 5)
        assert saved[0] == ledger.ACK_BATCH  # the first save ended; the backlog's started
        await buffer.flush()
        assert saved == [ledger.ACK_BATCH, ledger.ACK_BACKLOG + 1]

    asyncio.run(scenario())
