"""Staging: of a user's rows, the first in the source's order wins on either store, wherever
the database puts the rows."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from sqlalchemy import Engine, select

from audience_sync.fakegist import FakeGist
from audience_sync.models import member_changes
from audience_sync.sync import run_once
from tests.conftest import Workspace

USERS = 5000


def duplicated_rows(seed: int = 2) -> list[tuple[str, str]]:
    """Two rows per user, one after the other, of varied widths (PostgreSQL fills a page's
    leftover room with a later, shorter row), and now and then a rejected row between them
    (a batch with rejected rows closes PostgreSQL's COPY, and the next one opens another)."""
    pick = random.Random(seed)
    rows = []
    for user in range(USERS):
        for which in ("first", "later"):
            padding = "x" * pick.choice([0, 0, 5, 40, 200])
            rows.append((f"u{user}", f"{which}.{user}.{padding}@example.com"))
            if pick.random() < 0.01:
                rows.append((f"u{user}", "not an email"))
    return rows


def test_the_first_row_of_a_user_wins_wherever_the_database_puts_it(
    workspace: Workspace, engine: Engine, gist: FakeGist, tmp_path: Path
) -> None:
    path = tmp_path / "members.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "email"])
        writer.writerows(duplicated_rows())
    workspace.audiences.append({"name": "VIP", "file": path.name})
    workspace.write_config()

    [run] = run_once(workspace.settings(), engine, dry_run=True)

    assert (run.status, run.members) == ("succeeded", USERS)
    with engine.connect() as connection:
        emails = connection.scalars(
            select(member_changes.c.email).where(member_changes.c.run_id == run.run_id)
        ).all()
    assert len(emails) == USERS
    assert [email for email in emails if not email.startswith("first.")] == []
