"""drop staged_members (snapshots are per-run temporary tables)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 09:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # Snapshots are per-run temporary tables now, gone with their connection; a row left here
    # by a run of an older version that was killed while staging means nothing to anyone.
    op.drop_table("staged_members")


def downgrade() -> None:
    """Downgrade schema."""
    # As 0001 created it and 0003 extended it (an older version stages into it).
    op.create_table(
        "staged_members",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("value", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "user_id", name=op.f("pk_staged_members")),
    )
