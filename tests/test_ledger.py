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
