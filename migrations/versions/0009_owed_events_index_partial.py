"""owed-events index holds only changes with an event: a plan of changes without one writes
one index fewer

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 17:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_member_changes_event_status_audience_key"


def upgrade() -> None:
    """Upgrade schema: the index of owed events skips the changes that owe none (NULL
    ``event_status``: every change of an audience without ``send_track``, and every dry
    run's), which is what every lookup of it asks for (``ledger.owed_event``)."""
    op.drop_index(INDEX, table_name="member_changes")
    op.create_index(
        INDEX,
        "member_changes",
        ["event_status", "audience_key"],
        unique=False,
        postgresql_where=sa.text("event_status IS NOT NULL"),
        sqlite_where=sa.text("event_status IS NOT NULL"),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(INDEX, table_name="member_changes")
    op.create_index(INDEX, "member_changes", ["event_status", "audience_key"], unique=False)
