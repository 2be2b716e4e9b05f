"""The shared rate budget against a database clock that steps back: the schedule moves back
with the clock instead of stalling every process for as long as the step."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine, select, update

from audience_sync.budget import AHEAD_SECONDS, SharedBudget
from audience_sync.fakegist import FakeGist
from audience_sync.models import rate_limits
from audience_sync.sync import run_once
from tests.conftest import Workspace, write_members
from tests.helpers import in_gist, users

HOUR = 3600.0


def shift(engine: Engine, workspace: str, *, next_free: float, claimed_at: float | None) -> None:
    """Move the stored schedule by these many seconds (claimed_at: None clears it)."""
    values = {"next_free": rate_limits.c.next_free + next_free}
    with engine.begin() as connection:
        connection.execute(
            update(rate_limits)
            .where(rate_limits.c.workspace == workspace)
            .values(
                **values,
                claimed_at=None if claimed_at is None else rate_limits.c.claimed_at + claimed_at,
            )
        )


def test_a_clock_that_stepped_back_moves_the_schedule_back(engine: Engine) -> None:
    """A claim just before the database's clock stepped back an hour: to the clock now, the
    last claim and the schedule lie an hour ahead. The next claim starts where the schedule
    stood relative to that claim, not an hour from now."""
    budget = SharedBudget(engine, "ws-step")
    first = budget.claim(10, 0.01)
    shift(engine, "ws-step", next_free=HOUR, claimed_at=HOUR)  # = the clock going back

    block = budget.claim(10, 0.01)

    assert block.start <= block.at + (first.end - first.at) + 0.05
    assert block.start < block.at + AHEAD_SECONDS


def test_a_schedule_far_ahead_that_no_claim_explains_starts_afresh(engine: Engine) -> None:
    budget = SharedBudget(engine, "ws-far")
    budget.claim(1, 0.01)
    time.sleep(AHEAD_SECONDS + 0.1)  # no one claims for more than a window
    shift(engine, "ws-far", next_free=HOUR, claimed_at=0.0)

    block = budget.claim(1, 0.01)

    assert block.start == pytest.approx(block.at, abs=0.05)
    with engine.begin() as connection:  # and with no claim ever recorded (older states)
        connection.execute(update(rate_limits).values(claimed_at=None, next_free=block.at + HOUR))
    assert budget.claim(1, 0.01).start < block.at + AHEAD_SECONDS + 1


def test_claims_of_processes_sending_together_never_overlap_however_far_ahead(
    engine: Engine,
) -> None:
    """A schedule that runs ahead because others claimed just now is theirs: the next claim
    starts after it, however far ahead that is."""
    budget = SharedBudget(engine, "ws-busy")
    blocks = [budget.claim(100, 0.01) for _ in range(5)]  # 5 s of schedule, claimed at once
    assert blocks[-1].start >= blocks[-2].end - 1e-6
    assert blocks[-1].start > blocks[-1].at + AHEAD_SECONDS


def test_a_sync_after_the_clock_stepped_back_sends_at_once(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")
    write_members(source, range(3))
    run_once(workspace.settings(), engine)
    with engine.connect() as connection:
        [name] = connection.scalars(select(rate_limits.c.workspace))
    shift(engine, name, next_free=HOUR, claimed_at=HOUR)
    write_members(source, range(6))

    started = time.monotonic()
    [result] = run_once(workspace.settings(), engine)

    assert (result.status, result.delivered) == ("succeeded", 3)
    assert in_gist(gist) == users(*range(6))
    assert time.monotonic() - started < 60  # an hour's step is not an hour of nothing sent
