"""Property: whatever the sequence of snapshots and delivery failures, one failure-free run
makes Gist equal to the last snapshot (its members and their emails), and a further run
sends nothing."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from audience_sync.fakegist import FakeGist
from audience_sync.models import memberships
from audience_sync.naming import property_key
from audience_sync.sync import run_once
from tests.conftest import Workspace, write_members

USERS = 12
examples = itertools.count()

# A snapshot: members with an email variant each, duplicates allowed (a user may appear
# twice with different emails), in any order.
snapshots = st.lists(
    st.tuples(st.integers(0, USERS - 1), st.integers(0, 2)), min_size=0, max_size=20
)
faults = st.one_of(
    st.none(),
    st.tuples(st.just("fail_user"), st.integers(0, USERS - 1)),
    st.tuples(st.just("fail_after"), st.integers(0, 6)),
    st.tuples(st.just("fail_next"), st.integers(1, 6)),
    st.tuples(st.just("drop_next"), st.integers(1, 4)),
)


def inject(gist: FakeGist, fault: Any) -> None:
    if fault is None:
        return
    kind, n = fault
    if kind == "fail_user":
        gist.fail_user(f"u{n}", 422)
    elif kind == "fail_after":
        gist.fail_after(n, 503)
    elif kind == "fail_next":
        gist.fail_next(n, 500)
    else:
        gist.drop_next(n)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(st.tuples(snapshots, faults), min_size=1, max_size=5))
def test_gist_converges_to_the_last_snapshot(
    workspace: Workspace, engine: Engine, gist: FakeGist, steps: list[Any]
) -> None:
    workspace.gist_options.update(max_retries=1, max_concurrency=3)
    # A fresh audience per example: its own property key, so examples never mix.
    name = f"Property Audience {next(examples)}"
    key = property_key(name)
    workspace.audiences.clear()
    source = workspace.add_file_audience(name)

    for snapshot, fault in steps:
        write_members(source, [(f"u{u}", f"u{u}.{v}@example.com") for u, v in snapshot])
        inject(gist, fault)
        # The guard is tested elsewhere; here every exit is allowed through.
        run_once(workspace.settings(), engine, allow_mass_exit=True)
        gist.reset_faults()

    [final] = run_once(workspace.settings(), engine, allow_mass_exit=True)

    last: dict[str, str] = {}  # member -> email: a user's first row wins
    for u, v in steps[-1][0]:
        last.setdefault(f"u{u}", f"u{u}.{v}@example.com")
    held = gist.properties(key)
    assert final.status == "succeeded"
    assert {u for u, v in held.items() if v is True} == set(last)
    assert all(v is False for u, v in held.items() if u not in last)
    # Through changing emails too: Gist holds each member's email of the last snapshot, and
    # so does the ledger.
    contacts = gist.contacts()
    assert {u: contacts[u]["email"] for u in last} == last
    with engine.connect() as connection:
        ledger = connection.execute(
            select(memberships.c.user_id, memberships.c.email).where(
                memberships.c.audience_key == key
            )
        ).all()
    assert dict(ledger) == last, (steps, final)
    gist.clear_log()
    [idle] = run_once(workspace.settings(), engine, allow_mass_exit=True)
    assert (idle.entered, idle.exited) == (0, 0)
    assert gist.requests() == []
