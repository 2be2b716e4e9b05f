"""sync_runs.resumed: a backfill resumes only when asked, and a chain of them starts at one
that did not

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08 01:20:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema: whether a backfill skipped whom the unfinished backfills before it
    reached (``backfill --resume``). Runs before this revision read as not resumed, so a
    resume after the upgrade continues the last of them only: more sent, never less."""
    # A plain ADD COLUMN: a batch would rebuild sync_runs on SQLite, which member_changes'
    # foreign key forbids.
    op.add_column(
        "sync_runs",
        sa.Column("resumed", sa.Boolean(), server_default=sa.false(), nullable=False),
    )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.drop_column("resumed")
