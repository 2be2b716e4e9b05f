"""Helpers several test modules share (fixtures live in conftest.py): what Gist and the
state database hold, and a free loopback port."""

from __future__ import annotations

import socket

from sqlalchemy import Engine, select

from audience_sync.fakegist import FakeGist
from audience_sync.models import memberships

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
