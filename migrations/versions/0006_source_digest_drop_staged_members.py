"""source digests, config fingerprints and fast-path runs; drop staged_members

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 09:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # Runs before this revision have no digest, so the first run after it is a full diff.
    # Plain ADD COLUMNs: a batch would rebuild sync_runs on SQLite, which member_changes'
    # foreign key forbids.
    op.add_column("sync_runs", sa.Column("source_digest", sa.String(length=64), nullable=True))
    op.add_column("sync_runs", sa.Column("config_fingerprint", sa.String(length=64), nullable=True))
    op.add_column(
        "sync_runs",
        sa.Column("fast_path", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
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
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.drop_column("fast_path")
        batch_op.drop_column("config_fingerprint")
        batch_op.drop_column("source_digest")
