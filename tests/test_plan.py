"""The plan's mass-exit guard at its boundaries: it stops a run that would remove *more than*
the threshold share (default 50%) of an audience of *at least* the minimum size (default
100), and nothing else; checked through ``run_once`` on both stores."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from audience_sync.fakegist import FakeGist
from audience_sync.sync import run_once
from tests.conftest import Workspace, write_members
from tests.helpers import acknowledged, in_gist, users

BOUNDARIES = [
    # (members Gist acknowledged, how many of them leave, guarded?)
    pytest.param(100, 50, False, id="exactly-the-threshold-share-is-not-guarded"),
    pytest.param(100, 51, True, id="one-over-the-threshold-at-exactly-the-minimum-size"),
    pytest.param(99, 51, False, id="one-under-the-minimum-size-is-not-guarded"),
    pytest.param(101, 51, True, id="one-over-the-minimum-size"),
]


@pytest.mark.parametrize(("held", "leaving", "guarded"), BOUNDARIES)
def test_the_mass_exit_guard_at_its_boundaries(
    workspace: Workspace, engine: Engine, gist: FakeGist, held: int, leaving: int, guarded: bool
) -> None:
    source = workspace.add_file_audience("Order Completed Last 30days")  # the defaults
    write_members(source, range(held))
    assert run_once(workspace.settings(), engine)[0].delivered == held
    write_members(source, range(leaving, held))
    gist.clear_log()

    [run] = run_once(workspace.settings(), engine)

    if guarded:
        assert run.status == "guarded"
        assert f"would remove {leaving} of {held} members" in (run.error or "")
        assert gist.requests() == []
        assert acknowledged(engine) == in_gist(gist) == users(*range(held))
    else:
        assert (run.status, run.exited, run.delivered) == ("succeeded", leaving, leaving)
        assert acknowledged(engine) == in_gist(gist) == users(*range(leaving, held))
