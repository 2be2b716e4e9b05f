"""Helpers several test modules share (fixtures live in conftest.py): what Gist and the
state database hold, a free loopback port, and the one place tests call the lease module
(so a change of its signatures is repointed here, not in every test)."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import DateTime, Engine, select, type_coerce

from audience_sync import lease
from audience_sync.fakegist import FakeGist
from audience_sync.models import leases, memberships

KEY = "order_completed_last_30days"  # the property of "Order Completed Last 30days"


def acknowledged(engine: Engine, key: str = KEY) -> set[str]:
    """The members of ``key`` the state database holds as acknowledged by Gist."""
    with engine.connect() as connection:
        return set(
            connection.scalars(
                select(memberships.c.user_id).where(memberships.c.audience_key == key)
            )
        )


def in_gist(gist: FakeGist, key: str = KEY) -> set[str]:
    """The users whose property ``key`` is ``true`` in the fake Gist."""
    return {user for user, value in gist.properties(key).items() if value is True}


def users(*numbers: int) -> set[str]:
    """``{"u1", "u2", …}`` for ``users(1, 2, …)``."""
    return {f"u{n}" for n in numbers}


def free_port() -> int:
    """A loopback port nothing listens on (right now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Leases ------------------------------------------------------------------------------------

LEASE_SECONDS = lease.LEASE_SECONDS  # the length a lease is taken and renewed for


def take_lease(engine: Engine, key: str, owner: str) -> str | None:
    """``lease.acquire``: the previous owner when an expired or dead lease was taken over;
    raises LockHeldError when another owner's lease is live."""
    return lease.acquire(engine, key, owner)


def renew_leases(engine: Engine, keys: Iterable[str], owner: str) -> set[str]:
    """``lease.renew`` in a transaction of its own: the keys ``owner`` still holds."""
    with engine.begin() as connection:
        return lease.renew(connection, keys, owner)


def lease_of(engine: Engine, key: str) -> tuple[str, datetime, datetime] | None:
    """The lease row of ``key``: (owner, acquired_at, expires_at), naive UTC."""
    with engine.connect() as connection:
        row = connection.execute(
            select(leases.c.owner, leases.c.acquired_at, leases.c.expires_at).where(
                leases.c.audience_key == key
            )
        ).first()
    return None if row is None else (row.owner, row.acquired_at, row.expires_at)


def database_time(engine: Engine) -> datetime:
    """The state database's own clock, naive UTC, as leases are stamped with it."""
    with engine.connect() as connection:
        now = connection.scalar(
            select(type_coerce(lease.database_now(engine.dialect.name), DateTime()))
        )
    assert isinstance(now, datetime)
    return now
